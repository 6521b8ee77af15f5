"""Single-answer grading: one judge call scores one response to one prompt, 1-10.

GPT-4-LLM (SPEC §4) had GPT-4 score each of K responses 1-10 but did not publish its
prompt. gleaner uses the published single-answer grading prompt of MT-Bench (Zheng et al.
2023, FastChat ``llm_judge/data/judge_prompts.jsonl``, ``single-v1``) verbatim: each
response is judged on its own, so a score does not depend on the other responses shown,
and a judgement is cached per (prompt, response, judge). The answer's ``[[n]]`` is the
score (FastChat's own parse: ``[[n]]``, then ``[n]``); a score outside 1-10 or none at all
is a parse failure, asked again ``parse_retries`` times, then a failed row with the raw text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gleaner.engine.llm_rows import Call, ParseFailure

GRADING_SYSTEM = "You are a helpful assistant."
GRADING_TEMPLATE = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question displayed below. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
    "response. Begin your evaluation by providing a short explanation. Be as objective as "
    "possible. After providing your explanation, you must rate the response on a scale of 1 to "
    "10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PROMPT_VERSION = hashlib.sha256(
    f"{GRADING_SYSTEM}\x00{GRADING_TEMPLATE}".encode()).hexdigest()[:12]

# llama.cpp GBNF: the answer is exactly "Rating: [[n]]" (a 135M judge writes prose otherwise).
RATING_GRAMMAR = 'root ::= "Rating: [[" score "]]"\nscore ::= "10" | [1-9]\n'

_DOUBLE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SINGLE = re.compile(r"\[(\d+\.?\d*)\]")


def grading_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": GRADING_SYSTEM},
            {"role": "user", "content": GRADING_TEMPLATE.format(question=question, answer=answer)}]


def parse_rating(text: str) -> float | None:
    """The first ``[[n]]`` of a review, else the first lone ``[n]`` (FastChat's
    ``re.search`` with its backup pattern); None when there is none, or, stricter than
    FastChat (which would keep it), when it is outside the 1-10 scale."""
    found = _DOUBLE.findall(text) or _SINGLE.findall(text)
    if not found:
        return None
    value = float(found[0])
    return value if 1.0 <= value <= 10.0 else None


def prompt_text(turns: Sequence[Mapping[str, str]]) -> str:
    """What the judge is shown as the question: the user turn, or for a conversation every
    turn before the graded answer, one ``Role: text`` paragraph each."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


@dataclass(frozen=True)
class GradingSettings:
    max_tokens: int = 1024
    temperature: float = 0.0
    parse_retries: int = 2
    grammar: bool = False

    def as_dict(self, model: str) -> dict[str, Any]:
        """What changes a grade (the judge stage's cache key besides the row's content)."""
        return {"model": model, "prompt_version": PROMPT_VERSION, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "parse_retries": self.parse_retries,
                "grammar": self.grammar}


def read_rating(completion: Any) -> float:
    rating = parse_rating(completion.text)
    if rating is None:
        raise ParseFailure("no rating [[1-10]] in the judge's answer")
    return rating


def grading_call(messages: Sequence[Mapping[str, str]], settings: GradingSettings) -> Call:
    """One grading request (``messages``: ``single-v1`` of a question and an answer, or
    another FastChat grading prompt rendered, as MT-Bench's) and how its rating is read."""
    options = {"extra_body": {"grammar": RATING_GRAMMAR}} if settings.grammar else {}
    return Call(read_rating, messages, max_tokens=settings.max_tokens,
                temperature=settings.temperature, options=options,
                parse_retries=settings.parse_retries)
