"""The pairwise judge: AlpaGasus' prompt (SPEC §6), both orders, strict score parsing.

Every pair is judged twice, once with the curated model's answer (A) as
Assistant 1 and once as Assistant 2. A review whose first line does not hold
two scores is asked again (``parse_retries`` times) and then recorded as a
judge failure with its raw text: never as a tie. Transport errors (429, 5xx,
timeouts) are retried with back-off by the openai SDK itself; when those run
out, the order is a failure too, with the error kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gleaner.config import EndpointConfig
from gleaner.engine.llm_rows import Call, ParseFailure, Reading, RowCost, ask_or_fail
from gleaner.llm.client import LLMClient
from gleaner.tasks.evaluate.verdicts import RULES, Outcome, Verdict, order_outcome, verdict

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

JUDGE_REQUEST = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)

JUDGE_USER_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n"
    "[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n"
    "[The End of Assistant 2's Answer]\n\n"
    "[System]\n" + JUDGE_REQUEST
)

PROMPT_VERSION = hashlib.sha256(
    f"{JUDGE_SYSTEM}\x00{JUDGE_USER_TEMPLATE}".encode()).hexdigest()[:12]
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 1024

# llama.cpp's GBNF for AlpaGasus' answer format: a first line of two scores 1-10 separated by a
# space, then a newline and free text. A small model (the offline SmolLM2) answers the prompt
# with prose; constrained, its first line is always one that parse_scores reads.
SCORE_LINE_GRAMMAR = r'''root ::= score " " score "\n" text
score ::= "10" | [1-9]
text ::= [^\x00]*
'''

_NUMBER = r"(\d+(?:\.\d+)?)"
_LABEL = re.compile(r"\b(?:assistant|answer)\s*[12]\s*[:=\-]?", re.IGNORECASE)
_OUT_OF_TEN = re.compile(_NUMBER + r"\s*/\s*10\b")


def judge_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    user = JUDGE_USER_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_scores(review: str) -> tuple[float, float] | None:
    """The two scores on the first non-empty line, or None when there are not exactly two.

    Accepts "8 6", "8.5 9", "8, 6", "Assistant 1: 8 Assistant 2: 6", "8/10 6/10".
    Scores outside 0-10 are rejected: they are not scores on the prompt's scale.
    """
    first = next((line for line in review.splitlines() if line.strip()), "")
    cleaned = _OUT_OF_TEN.sub(r"\1", _LABEL.sub(" ", first))
    numbers = re.findall(_NUMBER, cleaned)
    # Anything other than numbers, separators and a "scores:" lead-in means prose, not a score line.
    residue = re.sub(_NUMBER, " ", cleaned)
    residue = re.sub(r"(?i)\b(?:scores?|and)\b", " ", residue)
    if len(numbers) != 2 or re.search(r"[A-Za-z]", residue):
        return None
    scores = (float(numbers[0]), float(numbers[1]))
    if not all(0.0 <= s <= 10.0 for s in scores):
        return None
    return scores


@dataclass
class Review:
    """One judge call (one order), after parse retries."""

    scores: tuple[float, float] | None
    raw: str
    attempts: int
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kind: str | None = None  # why there are no scores: parse, or the client error's kind


@dataclass
class Pair:
    """One question with the two answers to compare; A is the model under test (curated)."""

    test_set: str
    key: str
    question: str
    answer_a: str
    answer_b: str


@dataclass
class PairJudgement:
    pair: Pair
    a_first: Review
    b_first: Review
    rule: str
    outcome_a_first: Outcome | None = None
    outcome_b_first: Outcome | None = None
    verdict: Verdict = "failed"
    extra: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        def scores(review: Review, index: int) -> float | None:
            return None if review.scores is None else review.scores[index]

        errors = [r for r in (self.a_first, self.b_first) if r.scores is None]
        return {
            "status": "failed" if errors else "ok",
            "error_kind": errors[0].kind if errors else None,
            "test_set": self.pair.test_set,
            "key": self.pair.key,
            "question": self.pair.question,
            "answer_a": self.pair.answer_a,
            "answer_b": self.pair.answer_b,
            "a_first_score_1": scores(self.a_first, 0),
            "a_first_score_2": scores(self.a_first, 1),
            "b_first_score_1": scores(self.b_first, 0),
            "b_first_score_2": scores(self.b_first, 1),
            "outcome_a_first": self.outcome_a_first,
            "outcome_b_first": self.outcome_b_first,
            "review_a_first": self.a_first.raw,
            "review_b_first": self.b_first.raw,
            "attempts": self.a_first.attempts + self.b_first.attempts,
            "error": "; ".join(e for e in (self.a_first.error, self.b_first.error) if e) or None,
            "prompt_tokens": self.a_first.prompt_tokens + self.b_first.prompt_tokens,
            "completion_tokens": self.a_first.completion_tokens + self.b_first.completion_tokens,
        }


def read_scores(completion: Any) -> tuple[float, float]:
    scores = parse_scores(completion.text)
    if scores is None:
        raise ParseFailure("unparseable review: no two scores on the first line")
    return scores


def review_of(reading: Reading, cost: RowCost | None = None) -> Review:
    """One order's review from what the row loop read (its cost, when it is known alone)."""
    cost = cost or RowCost()
    return Review(reading.value, reading.raw or "", cost.attempts, reading.error,
                  cost.prompt_tokens, cost.completion_tokens, reading.kind)


def judged(pair: Pair, a_first: Review, b_first: Review, rule: str) -> PairJudgement:
    """Map both orders to A's outcomes (A is Assistant 1, then Assistant 2) and combine."""
    first = None if a_first.scores is None else order_outcome(*a_first.scores, a_is_assistant=1)
    second = None if b_first.scores is None else order_outcome(*b_first.scores, a_is_assistant=2)
    return PairJudgement(
        pair=pair, a_first=a_first, b_first=b_first, rule=rule,
        outcome_a_first=first, outcome_b_first=second, verdict=verdict(first, second, rule),
    )


class Judge:
    """AlpaGasus' question to any OpenAI-compatible chat endpoint, through the shared LLM client
    (SDK back-off, body retries, bounded concurrency, cluster-wide limits, token accounting)."""

    def __init__(self, endpoint: EndpointConfig, parse_retries: int = 2,
                 max_tokens: int = JUDGE_MAX_TOKENS, temperature: float = JUDGE_TEMPERATURE,
                 grammar: str | None = None, concurrency: int = 16):
        if not endpoint.base_url:
            raise ValueError("the judge needs an endpoint base_url")
        self.endpoint = endpoint
        self.parse_retries = parse_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency
        # llama.cpp's `grammar` request field (a GBNF string); None sends no such field.
        self.grammar = grammar

    def __repr__(self) -> str:  # never the key
        return f"Judge(model={self.endpoint.model!r}, base_url={self.endpoint.base_url!r})"

    def settings(self) -> dict[str, Any]:
        """What changes a judgement (the cache key of the judge stage)."""
        return {"model": self.endpoint.model, "prompt_version": PROMPT_VERSION,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "grammar": bool(self.grammar), "parse_retries": self.parse_retries}

    def call(self, question: str, answer_1: str, answer_2: str) -> Call:
        """One order's request; a failure leaves the other order's review standing."""
        options = {"extra_body": {"grammar": self.grammar}} if self.grammar else {}
        return Call(read_scores, judge_messages(question, answer_1, answer_2),
                    max_tokens=self.max_tokens, temperature=self.temperature, options=options,
                    parse_retries=self.parse_retries, may_fail=True)

    def calls(self, pair: Pair) -> list[Call]:
        """Both orders: A's answer as Assistant 1, then as Assistant 2."""
        return [self.call(pair.question, pair.answer_a, pair.answer_b),
                self.call(pair.question, pair.answer_b, pair.answer_a)]

    async def _review(self, client: LLMClient, call: Call) -> Review:
        cost = RowCost()
        reading = await ask_or_fail(client, call, self.parse_retries, cost)
        return review_of(reading, cost)

    async def judge_with(self, client: LLMClient, pairs: Sequence[Pair],
                         rule: str = "alpagasus") -> list[PairJudgement]:
        """Both orders of every pair through ``client``; results in the order of ``pairs``."""

        async def one(pair: Pair) -> PairJudgement:
            a_first, b_first = await asyncio.gather(*(self._review(client, call)
                                                      for call in self.calls(pair)))
            return judged(pair, a_first, b_first, rule)

        return list(await asyncio.gather(*(one(p) for p in pairs)))

    def judge(self, pairs: Sequence[Pair], rule: str = "alpagasus") -> list[PairJudgement]:
        """Judge every pair in both orders with a client of its own (scripts, benchmarks)."""
        if rule not in RULES:
            raise ValueError(f"unknown combination rule {rule!r}; choose one of {', '.join(RULES)}")
        if not pairs:
            return []

        async def go() -> list[PairJudgement]:
            async with LLMClient(self.endpoint, concurrency=self.concurrency) as client:
                return await self.judge_with(client, pairs, rule)

        return asyncio.run(go())
