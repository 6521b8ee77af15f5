"""Rating back ends: how one example's rating is asked for and read. A registry.

- ``explain`` (the paper's): the model writes the score on the first line and
  an explanation after it; the whole answer is kept in ``raw``.
- ``score-only``: one completion token with top_logprobs; the score is the
  expected value over the tokens "0".."5". An endpoint that sends no logprobs
  makes the stage fall back to ``explain`` (and the row says so in ``mode``).

A new back end is a class with ``name``, ``needs_logprobs`` and ``ask``, and one
``register("rater", name)(...)`` line; ``rate.mode`` and ``--mode`` accept it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gleaner.llm.client import SCORE_TOKENS_0_5, Completion, expected_score
from gleaner.registry import register, registry
from gleaner.tasks.rate.parse import parse_score


@dataclass
class RateOptions:
    parse_retries: int = 2
    explain_max_tokens: int = 256
    top_logprobs: int = 20


@dataclass
class Answer:
    """One answer read: a score, or why not (``no_logprobs``: the endpoint cannot score-only)."""

    completion: Completion
    score: float | None
    raw: str | None
    reason: str | None = None
    no_logprobs: bool = False


class Rater(Protocol):
    name: str
    needs_logprobs: bool

    async def ask(self, client: Any, messages: Sequence[dict[str, str]],
                  options: RateOptions) -> Answer: ...


class ExplainRater:
    name = "explain"
    needs_logprobs = False

    async def ask(self, client: Any, messages: Sequence[dict[str, str]],
                  options: RateOptions) -> Answer:
        completion = await client.chat(messages, max_tokens=options.explain_max_tokens)
        parsed = parse_score(completion.text)
        return Answer(completion, parsed.score, completion.text, parsed.reason)


class ScoreOnlyRater:
    name = "score-only"
    needs_logprobs = True

    async def ask(self, client: Any, messages: Sequence[dict[str, str]],
                  options: RateOptions) -> Answer:
        completion = await client.chat(messages, max_tokens=1, logprobs=True,
                                       top_logprobs=options.top_logprobs)
        if completion.top_logprobs is None:
            return Answer(completion, None, None, "no logprobs", no_logprobs=True)
        first = completion.top_logprobs[0]
        score = expected_score(first, SCORE_TOKENS_0_5)
        return Answer(completion, score, json.dumps(first, sort_keys=True),
                      None if score is not None else "no score token 0-5 in top_logprobs")


register("rater", "explain")(ExplainRater())
register("rater", "score-only")(ScoreOnlyRater())


def rater(name: str) -> Rater:
    return registry("rater").get(name)
