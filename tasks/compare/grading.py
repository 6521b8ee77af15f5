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

from gleaner.llm.client import LLMClient, LLMError

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


@dataclass
class Grade:
    score: float | None
    raw: str | None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    kind: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {"score": self.score, "raw": self.raw, "attempts": self.attempts,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": self.latency_ms, "error": self.error, "error_kind": self.kind,
                "status": "ok" if self.score is not None else "failed"}


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


async def grade(client: LLMClient, question: str, answer: str,
                settings: GradingSettings,
                messages: Sequence[Mapping[str, str]] | None = None) -> Grade:
    """One response graded; a fatal client error (key, model, dead server) is raised.
    ``messages``: another FastChat grading prompt, rendered (MT-Bench's reference-based
    and multi-turn ones); the default is ``single-v1`` of ``question`` and ``answer``."""
    out = Grade(None, None)
    extra = {"extra_body": {"grammar": RATING_GRAMMAR}} if settings.grammar else {}
    messages = messages or grading_messages(question, answer)
    for _ in range(settings.parse_retries + 1):
        try:
            completion = await client.chat(messages,
                                           max_tokens=settings.max_tokens,
                                           temperature=settings.temperature, **extra)
        except LLMError as error:
            if error.fatal:
                raise
            out.attempts += error.attempts
            out.error, out.kind = str(error), error.kind
            return out
        out.attempts += completion.attempts
        out.prompt_tokens += completion.prompt_tokens
        out.completion_tokens += completion.completion_tokens
        out.latency_ms += completion.latency_ms
        out.raw = completion.text
        out.score = parse_rating(completion.text)
        if out.score is not None:
            return out
    out.error = f"no rating [[1-10]] in the judge's answer after {settings.parse_retries + 1} tries"
    out.kind = "parse"
    return out
