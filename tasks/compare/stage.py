"""The grading stage on the engine: every (prompt, response) row graded 1-10 by the judge.

Its input (``compare/responses``) is rebuilt from the sources on every run, with ids that
hash the prompt and the response: a grade is cached across runs per (prompt, response,
judge settings), a rerun grades only what it lacks, and new responses to a known prompt
cost one call each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import CompareConfig, EndpointConfig
from gleaner.engine import Conversation, LLMRowStage, stage_schema
from gleaner.engine.stage import declare
from gleaner.llm.client import LLMClient
from gleaner.llm.offline import OfflineRole, capped_concurrency
from gleaner.registry import register
from gleaner.tasks.compare.grading import GradingSettings, grading_call, grading_messages

GRADE_SCHEMA = stage_schema(
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("score", pa.float64()),  # 1-10; null unless status == "ok"
    pa.field("raw", pa.string()),
    pa.field("judge_model", pa.string(), nullable=False),
    llm=True,
)


class GradeStage(LLMRowStage):
    """GPT-4-LLM's judge: each response to each prompt scored 1-10 (single-answer grading)."""

    declared = declare(batch_size=64, concurrency=16)

    name = layout.COMPARE_JUDGE
    input_stage = layout.COMPARE_RESPONSES
    input_columns = ("id", "prompt_id", "question", "response")
    follows_input = True  # other sources: grade what is new, reuse the rest from the cache
    summary_columns = ("score",)
    description = "single-answer grading of every response (GPT-4-LLM comparison data)"

    def __init__(self, section: CompareConfig):
        super().__init__(section)
        self.settings = section
        self.grading = GradingSettings(section.max_tokens, section.temperature,
                                       section.parse_retries, bool(section.grammar))

    @property
    def cache_name(self) -> str:
        return "compare-judge"

    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return GRADE_SCHEMA

    def requested(self) -> dict[str, Any]:
        return self.grading.as_dict(self.endpoint.model)

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        """One real grading request: key, model and endpoint, before any batch."""
        await client.chat(grading_messages("Say OK.", "OK."), max_tokens=1)
        return {}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        reading = yield grading_call(grading_messages(row["question"], row["response"]),
                                     self.grading)
        return {"score": reading.value}

    def carried(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt_id": row["prompt_id"]}

    def row_defaults(self) -> dict[str, Any]:
        return {"prompt_id": "", "judge_model": self.endpoint.model}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        scores = [s for s in ok.column("score").to_pylist() if s is not None]
        return {"judge_model": self.endpoint.model, "scored": ok.num_rows,
                "histogram": {str(k): sum(1 for s in scores if round(s) == k)
                              for k in range(1, 11)}}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        bars = " ".join(f"{k}:{v}" for k, v in (summary.get("histogram") or {}).items())
        return (f"judge `{summary['judge_model']}`: {summary.get('scored', 0):,} responses "
                f"graded 1-10 ({bars})\n\n" + counts_markdown(summary))


register("offline_role", "grader")(OfflineRole(
    "compare.endpoint", lambda c: {
        "compare.max_tokens": min(c.compare.max_tokens, c.compare.offline_max_tokens),
        "compare.grammar": c.compare.grammar is not False,  # forced to "Rating: [[n]]"
        **capped_concurrency(c, "compare.resources")}))
