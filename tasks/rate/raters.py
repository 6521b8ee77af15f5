"""Rating back ends: how one example's rating is asked for and read. A registry.

- ``explain`` (the paper's): the model writes the score on the first line and
  an explanation after it; the whole answer is kept in ``raw``.
- ``score-only``: one completion token with top_logprobs; the score is the
  expected value over the tokens "0".."5". An endpoint that sends no logprobs
  makes the stage fall back to ``explain`` (and the row says so in ``mode``).

A new back end is a class with ``name``, ``needs_logprobs`` and ``call`` (the
request and how its answer is read: gleaner.engine.llm_rows), and one
``register("rater", name)(...)`` line; ``rate.mode`` and ``--mode`` accept it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gleaner.engine.llm_rows import Call, ParseFailure, Reading
from gleaner.llm.client import SCORE_TOKENS_0_5, expected_score
from gleaner.registry import register, registry
from gleaner.tasks.rate.parse import parse_score

NO_LOGPROBS = object()  # what score-only reads from an endpoint that sends no logprobs


@dataclass
class RateOptions:
    parse_retries: int = 2
    explain_max_tokens: int = 256
    top_logprobs: int = 20


class Rater(Protocol):
    name: str
    needs_logprobs: bool

    def call(self, messages: Sequence[dict[str, str]], options: RateOptions) -> Call: ...


def read_explained(completion: Any) -> float:
    parsed = parse_score(completion.text)
    if parsed.score is None:
        raise ParseFailure(parsed.reason or "unparseable")
    return parsed.score


def read_expected_score(completion: Any) -> Reading:
    if completion.top_logprobs is None:
        return Reading(NO_LOGPROBS)
    first = completion.top_logprobs[0]
    raw = json.dumps(first, sort_keys=True)
    score = expected_score(first, SCORE_TOKENS_0_5)
    if score is None:
        raise ParseFailure("no score token 0-5 in top_logprobs", raw)
    return Reading(score, raw)


class ExplainRater:
    name = "explain"
    needs_logprobs = False

    def call(self, messages: Sequence[dict[str, str]], options: RateOptions) -> Call:
        return Call(read_explained, messages, max_tokens=options.explain_max_tokens)


class ScoreOnlyRater:
    name = "score-only"
    needs_logprobs = True

    def call(self, messages: Sequence[dict[str, str]], options: RateOptions) -> Call:
        return Call(read_expected_score, messages, max_tokens=1,
                    options={"logprobs": True, "top_logprobs": options.top_logprobs})


register("rater", "explain")(ExplainRater())
register("rater", "score-only")(ScoreOnlyRater())


def rater(name: str) -> Rater:
    return registry("rater").get(name)
