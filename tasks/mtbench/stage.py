"""MT-Bench grading on the engine: one row per (question, turn, answer), graded 1-10.

The input stage holds one model's grading requests, rendered (FastChat's
prompt for the question's category and turn, its questions, the model's
answers, the reference answers where the category needs them); each row's id
is a hash of exactly that text. So a grade is cached across models and runs by
what the judge was shown, a rerun grades only what it lacks, and a changed
answer is graded again. The judge's ``[[rating]]`` is parsed; an answer without
one is asked again ``parse_retries`` times and is then a failed row with the raw
text: never a score.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, GleanerConfig, StageSection
from gleaner.engine import Conversation, LLMRowStage, stage_schema
from gleaner.engine.stage import declare
from gleaner.llm.client import LLMClient
from gleaner.tasks.compare.grading import RATING_GRAMMAR, GradingSettings, grading_call
from gleaner.tasks.mtbench.prompts import PROMPT_VERSION, grading_messages, judge_prompt

REQUEST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("question_id", pa.int64(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("turn", pa.int32(), nullable=False),
    pa.field("judge_prompt", pa.string(), nullable=False),
    pa.field("system", pa.string(), nullable=False),
    pa.field("user", pa.string(), nullable=False),
])
GRADE_SCHEMA = stage_schema(
    pa.field("question_id", pa.int64(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("turn", pa.int32(), nullable=False),
    pa.field("judge_prompt", pa.string(), nullable=False),
    pa.field("rating", pa.float64()),  # 1-10, null unless ok
    pa.field("raw", pa.string()),  # the judge's last answer
    pa.field("judge_model", pa.string(), nullable=False),
    llm=True,
)


def request_rows(answers: pa.Table, references: Mapping[int, tuple[str, str] | None]
                 ) -> pa.Table:
    """Both turns of every answered question as rendered grading requests (content-hash ids)."""
    rows = []
    for a in answers.to_pylist():
        questions, replies = [a["question_1"], a["question_2"]], [a["answer_1"], a["answer_2"]]
        refs = references.get(a["question_id"])
        for turn in (1, 2):
            prompt = judge_prompt(a["category"], turn)
            system, user = (m["content"] for m in grading_messages(
                prompt, questions, replies, list(refs) if refs else None))
            blob = json.dumps([prompt.name, system, user], ensure_ascii=False)
            rows.append({"id": hashlib.sha256(blob.encode()).hexdigest()[:32],
                         "question_id": a["question_id"], "category": a["category"],
                         "turn": turn, "judge_prompt": prompt.name, "system": system,
                         "user": user})
    return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def grading_settings(config: GleanerConfig) -> GradingSettings:
    """What the judge is asked with; gleaner's own offline judge answers under the grammar."""
    settings, judge = config.mt_bench, config.evaluate.endpoint
    offline = bool(judge.local_server)
    return GradingSettings(
        max_tokens=settings.offline_max_tokens if offline else settings.max_tokens,
        temperature=0.0, parse_retries=settings.parse_retries,
        grammar=settings.grammar if settings.grammar is not None else offline)


class GradeStage(LLMRowStage):
    """FastChat's single-answer grading of one model's MT-Bench answers."""

    declared = declare(batch_size=64, concurrency=16)

    follows_input = True  # answers regenerated: grade what changed, reuse the rest
    input_columns = ("id", "question_id", "category", "turn", "judge_prompt", "system", "user")
    summary_columns = ("rating", "turn", "category")
    description = "MT-Bench single-answer grades (FastChat)"

    def __init__(self, config: GleanerConfig, label: str):
        m = config.mt_bench
        super().__init__(StageSection(resources=m.resources, cache=m.cache, force=m.force,
                                      retry_failed=m.retry_failed,
                                      max_failed_share=m.max_failed_share))
        self.judge = config.evaluate.endpoint
        self.grading = grading_settings(config)
        self.name = layout.mt_bench_grades_stage(label)
        self.input_stage = layout.mt_bench_requests_stage(label)

    @property
    def cache_name(self) -> str:
        return "mt_bench_grade"  # one cache for every model: keyed by what the judge is shown

    @property
    def endpoint(self) -> EndpointConfig:
        return self.judge

    @property
    def schema(self) -> pa.Schema:
        return GRADE_SCHEMA

    def requested(self) -> dict[str, Any]:
        g = self.grading
        return {"model": self.judge.model, "prompt_version": PROMPT_VERSION,
                "max_tokens": g.max_tokens, "temperature": g.temperature,
                "parse_retries": g.parse_retries, "grammar": g.grammar}

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        extra = {"extra_body": {"grammar": RATING_GRAMMAR}} if self.grading.grammar else {}
        await client.chat([{"role": "user", "content": "Say OK."}], max_tokens=1, **extra)
        return {}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        reading = yield grading_call([{"role": "system", "content": row["system"]},
                                      {"role": "user", "content": row["user"]}], self.grading)
        return {"rating": reading.value}

    def carried(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: row[k] for k in ("question_id", "category", "turn", "judge_prompt")}

    def row_defaults(self) -> dict[str, Any]:
        return {"judge_model": self.judge.model, "question_id": 0, "category": "", "turn": 0,
                "judge_prompt": ""}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        mean = pc.mean(ok["rating"]).as_py() if ok.num_rows else None
        return {"graded": ok.num_rows, "mean_rating": None if mean is None else round(mean, 4)}
