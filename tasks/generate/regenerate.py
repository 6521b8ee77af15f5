"""GPT-4-LLM's teacher regeneration (SPEC §8) on the engine: a teacher's answer to every example.

Every example of the run's ``ingest`` is asked again, as it was asked the first time: its
conversation without the final assistant turn, as chat messages (a single-turn example is one
user message, the instruction and its input; a LIMA conversation keeps its earlier turns). The
row keeps the original response beside the teacher's (``output_original``,
``output_teacher``), the teacher model, the finish reason and the tokens. The engine does the
rest: the cache by (example id, the settings below), failed rows with their errors, limits,
resume, the summary. A teacher answer cut by ``max_tokens`` stays ``ok`` with
``finish_reason = length`` (counted as ``truncated``); an empty answer is a failed row.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, RegenerateConfig
from gleaner.engine import AsyncBatchWorker, LLMStage, rows_table, stage_schema
from gleaner.llm.client import LLMClient, LLMError

# How the teacher is asked; a change here must change the version (cached answers go stale).
PROMPT_SCHEME = "conversation without its final assistant turn, as chat messages (v1)"

REGENERATE_SCHEMA = stage_schema(
    pa.field("teacher_model", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
    pa.field("output_original", pa.string()),  # the example's response, as ingested
    pa.field("output_teacher", pa.string()),  # null unless status == "ok"
    pa.field("finish_reason", pa.string()),
    llm=True,
)


def prompt_version(system_prompt: str | None) -> str:
    blob = f"{PROMPT_SCHEME}\x00{system_prompt or ''}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def teacher_messages(row: Mapping[str, Any], system_prompt: str | None = None
                     ) -> list[dict[str, str]]:
    """What the teacher is shown: the example's turns up to the answer it is to give."""
    turns: Sequence[Mapping[str, str]] = row.get("conversation") or []
    if turns and turns[-1]["role"] == "assistant":
        messages = [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
    else:  # no conversation column: the Alpaca triplet's user turn
        given = str(row.get("input") or "")
        instruction = str(row.get("instruction") or "")
        messages = [{"role": "user", "content": f"{instruction}\n\n{given}" if given
                     else instruction}]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


async def regenerate_one(row: Mapping[str, Any], client: LLMClient, settings: RegenerateConfig,
                         version: str) -> dict[str, Any]:
    """The teacher's answer to one example: ``ok`` with it, or ``failed`` with the error."""
    out: dict[str, Any] = {"id": row["id"], "teacher_model": client.model,
                           "prompt_version": version, "output_original": row.get("output"),
                           "status": "failed", "output_teacher": None, "finish_reason": None}
    try:
        completion = await client.chat(teacher_messages(row, settings.system_prompt),
                                       max_tokens=settings.max_tokens,
                                       temperature=settings.temperature)
    except LLMError as error:
        if error.fatal:
            raise
        return {**out, "error": str(error), "error_kind": error.kind, "attempts": error.attempts}
    out.update(attempts=completion.attempts, prompt_tokens=completion.prompt_tokens,
               completion_tokens=completion.completion_tokens, latency_ms=completion.latency_ms,
               finish_reason=completion.finish_reason)
    if not completion.text.strip():
        return {**out, "error": "the teacher answered with empty text", "error_kind": "empty"}
    return {**out, "status": "ok", "output_teacher": completion.text.strip()}


class RegenerateWorker(AsyncBatchWorker):
    stage: RegenerateStage

    async def aprocess(self, rows: pa.Table, client: LLMClient) -> pa.Table:
        stage = self.stage
        results = await asyncio.gather(*(regenerate_one(r, client, stage.settings, stage.version)
                                         for r in rows.to_pylist()))
        return rows_table(results, REGENERATE_SCHEMA)


class RegenerateStage(LLMStage):
    """The teacher's answer to every ingested example, beside the original."""

    name = layout.REGENERATE
    input_stage = layout.INGEST
    input_columns = ("id", "instruction", "input", "output", "conversation")
    summary_columns = ("finish_reason",)
    description = "teacher regeneration (GPT-4-LLM)"

    def __init__(self, section: RegenerateConfig):
        super().__init__(section)
        self.settings = section
        self.version = prompt_version(section.system_prompt)

    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return REGENERATE_SCHEMA

    def requested(self) -> dict[str, Any]:
        """The cache key's parts besides the example id: teacher, prompt, generation."""
        return {"teacher_model": self.endpoint.model, "prompt_version": self.version,
                "max_tokens": self.settings.max_tokens,
                "temperature": self.settings.temperature}

    def open(self) -> RegenerateWorker:
        return RegenerateWorker(self)

    def row_defaults(self) -> dict[str, Any]:
        return {"teacher_model": self.endpoint.model, "prompt_version": self.version}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        truncated = ok.filter(pc.equal(ok["finish_reason"], "length")).num_rows
        return {"teacher_model": self.endpoint.model, "prompt_version": self.version,
                "answered": ok.num_rows, "truncated": truncated,
                "max_tokens": self.settings.max_tokens}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        return (f"teacher `{summary['teacher_model']}`: {summary.get('answered', 0):,} answered "
                f"({summary.get('truncated', 0):,} cut at {summary['max_tokens']} tokens)\n\n"
                + counts_markdown(summary))
