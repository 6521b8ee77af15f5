"""Pairwise judging on the engine: one row per answer pair, both orders judged.

The input stage holds one test set's pairs (question, A's answer, B's answer),
each with an id that is a content hash of the three texts; the judge stage
writes each pair's two reviews. So a judgement is cached across runs by
(pair content, judge settings), a rerun judges only the parts it lacks, and a
test set whose answers changed is judged again only where they changed. The
combination rule is applied when the report is made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.config import EndpointConfig, GleanerConfig, StageSection
from gleaner.engine import Conversation, LLMRowStage, stage_schema
from gleaner.engine.stage import declare, resolve_resources
from gleaner.llm.client import LLMClient
from gleaner.llm.offline import OfflineRole, capped_concurrency
from gleaner.registry import register
from gleaner.tasks.evaluate.judge import (
    JUDGE_TEMPERATURE,
    SCORE_LINE_GRAMMAR,
    Judge,
    Pair,
    judge_messages,
    judged,
    review_of,
)

PAIR_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("test_set", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer_a", pa.string(), nullable=False),
    pa.field("answer_b", pa.string(), nullable=False),
])

_S, _F = pa.string(), pa.float64()
JUDGEMENT_SCHEMA = stage_schema(
    *(pa.field(name, kind) for name, kind in [
        ("test_set", _S), ("key", _S), ("question", _S), ("answer_a", _S), ("answer_b", _S),
        ("a_first_score_1", _F), ("a_first_score_2", _F), ("b_first_score_1", _F),
        ("b_first_score_2", _F), ("outcome_a_first", _S), ("outcome_b_first", _S),
        ("review_a_first", _S), ("review_b_first", _S), ("judge_model", _S)]),
    llm=True,
)


def pair_id(question: str, answer_a: str, answer_b: str) -> str:
    blob = json.dumps([question, answer_a, answer_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def pairs_table(pairs: Sequence[Pair]) -> pa.Table:
    return pa.Table.from_pylist([
        {"id": pair_id(p.question, p.answer_a, p.answer_b), "test_set": p.test_set,
         "key": p.key, "question": p.question, "answer_a": p.answer_a, "answer_b": p.answer_b}
        for p in pairs], schema=PAIR_SCHEMA)


def make_judge(config: GleanerConfig) -> Judge:
    """The judge ``config.evaluate`` describes (its endpoint must have a base_url)."""
    settings = config.evaluate
    return Judge(settings.endpoint, parse_retries=settings.parse_retries,
                 max_tokens=settings.max_tokens,
                 grammar=SCORE_LINE_GRAMMAR if settings.grammar else None,
                 concurrency=resolve_resources(JudgeStage.declared,
                                               settings.resources).concurrency)


def judge_section(config: GleanerConfig) -> StageSection:
    e = config.evaluate
    return StageSection(resources=e.resources, cache=e.cache, force=e.force,
                        max_failed_share=e.max_failed_share)


class JudgeStage(LLMRowStage):
    """AlpaGasus' pairwise judge over one test set of one comparison."""

    declared = declare(batch_size=64, concurrency=16)

    follows_input = True  # answers regenerated: judge the changed pairs, reuse the rest
    input_columns = ("id", "test_set", "key", "question", "answer_a", "answer_b")
    summary_columns = ("outcome_a_first", "outcome_b_first")
    description = "pairwise judgements (both orders)"

    def __init__(self, config: GleanerConfig, comparison: str, test_set: str):
        super().__init__(judge_section(config))
        self.judge = make_judge(config)
        self.name = layout.judge_stage(comparison, test_set)
        self.input_stage = layout.pairs_stage(comparison, test_set)

    @property
    def cache_name(self) -> str:
        return "judge"  # one cache for every comparison and test set: keyed by pair content

    @property
    def endpoint(self) -> EndpointConfig:
        return self.judge.endpoint

    @property
    def schema(self) -> pa.Schema:
        return JUDGEMENT_SCHEMA

    def requested(self) -> dict[str, Any]:
        return self.judge.settings()

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        """One real judge request (a trivial pair): key, model and endpoint, before any batch."""
        await client.chat(judge_messages("Say OK.", "OK.", "OK."), max_tokens=1,
                          temperature=JUDGE_TEMPERATURE)
        return {}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        """Both orders at once; the row is failed when either order is, with both reviews."""
        pair = Pair(row["test_set"], row["key"], row["question"], row["answer_a"],
                    row["answer_b"])
        a_first, b_first = yield self.judge.calls(pair)
        judgement = judged(pair, review_of(a_first), review_of(b_first), "alpagasus")
        fields = {k: v for k, v in judgement.as_row().items()
                  if k not in ("attempts", "prompt_tokens", "completion_tokens")}
        return {**fields, "judge_model": self.judge.endpoint.model}

    def row_defaults(self) -> dict[str, Any]:
        return {"judge_model": self.endpoint.model}


register("offline_role", "judge")(OfflineRole(
    "evaluate.endpoint", lambda c: {
        **capped_concurrency(c, "evaluate.resources"),
        "evaluate.max_tokens": c.evaluate.offline_max_tokens,
        "evaluate.grammar": c.evaluate.grammar is not False},
    "no judge endpoint configured: judging with the offline SmolLM2 server; set "
    "evaluate.endpoint.base_url (e.g. https://api.openai.com/v1) for GPT-4"))
