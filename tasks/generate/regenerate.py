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

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, RegenerateConfig
from gleaner.engine import Call, Conversation, LLMRowStage, ParseFailure, stage_schema
from gleaner.engine.stage import declare
from gleaner.llm.offline import OfflineRole, maker_settings
from gleaner.registry import register

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


def read_answer(completion: Any) -> tuple[str, str | None]:
    """The teacher's answer and why it stopped; an empty answer is a failure (not retried)."""
    if not completion.text.strip():
        raise ParseFailure("the teacher answered with empty text", kind="empty")
    return completion.text.strip(), completion.finish_reason


class RegenerateStage(LLMRowStage):
    """The teacher's answer to every ingested example, beside the original."""

    declared = declare(batch_size=64, concurrency=16)

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

    def conversation(self, row: dict[str, Any]) -> Conversation:
        settings = self.settings
        reading = yield Call(read_answer, teacher_messages(row, settings.system_prompt),
                             max_tokens=settings.max_tokens, temperature=settings.temperature,
                             parse_retries=0)
        answer, finish_reason = reading.value
        return {"output_teacher": answer, "finish_reason": finish_reason}

    def carried(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"output_original": row.get("output")}

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


register("offline_role", "teacher")(OfflineRole(
    "regenerate.endpoint", maker_settings("regenerate"),
    "no regenerate endpoint configured: the offline SmolLM2 server answers (a 135M model: "
    "expect poor answers); set regenerate.endpoint.base_url for a real teacher"))
