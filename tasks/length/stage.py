"""The length stage on the engine: every example's response length, in characters and tokens.

Long-is-more (Zhao et al., SPEC §9) keeps the examples with the longest
responses. "Longest" needs a unit: characters, or tokens of a named tokenizer
(``length.tokenizer``; the offline default is SmolLM2's, read from its GGUF).
A response is every assistant turn of the example (one for Alpaca records);
tokens are counted without special tokens. An actor stage, so each Ray actor
loads the tokenizer once; cached by (example id, tokenizer).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import LengthConfig
from gleaner.engine import Stage, rows_table, stage_schema
from gleaner.engine.stage import declare

LENGTH_SCHEMA = stage_schema(
    pa.field("response_chars", pa.int64()),
    pa.field("response_tokens", pa.int64()),
    pa.field("tokenizer", pa.string(), nullable=False),
)


def tokenizer_source(settings: LengthConfig) -> str:
    if settings.tokenizer:
        return settings.tokenizer
    from gleaner.models import smollm2_gguf

    return str(smollm2_gguf())


def tokenizer_name(settings: LengthConfig) -> str:
    from pathlib import Path

    source = tokenizer_source(settings)
    return Path(source).name if Path(source).exists() else source


def responses(conversation: list[dict[str, str]] | None, output: str) -> list[str]:
    """The texts that are "the response": every assistant turn (else the output field)."""
    turns = [t["content"] for t in (conversation or []) if t["role"] == "assistant"]
    return turns or [output]


class LengthWorker:
    def __init__(self, settings: LengthConfig):
        from gleaner.tasks.train.finetune import load_tokenizer

        self.name = tokenizer_name(settings)
        self.tokenizer = load_tokenizer(tokenizer_source(settings))

    def process(self, rows: pa.Table) -> pa.Table:
        out = []
        for row in rows.to_pylist():
            texts = responses(row.get("conversation"), row.get("output") or "")
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            out.append({"id": row["id"], "tokenizer": self.name, "status": "ok",
                        "response_chars": sum(len(t) for t in texts),
                        "response_tokens": sum(len(ids) for ids in encoded)})
        return rows_table(out, LENGTH_SCHEMA)

    def close(self) -> None:
        return None


class LengthStage(Stage):
    """Response characters and tokens of every ingested example."""

    declared = declare(batch_size=2048, actors=1)

    name = layout.LENGTH
    input_stage = layout.INGEST
    input_columns = ("id", "output", "conversation")
    kind = "actor"
    summary_columns = ("response_chars", "response_tokens")
    description = "response lengths (characters and tokens)"

    def __init__(self, section: LengthConfig):
        super().__init__(section)
        self.settings = section

    @property
    def schema(self) -> pa.Schema:
        return LENGTH_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_name(self.settings), "response": "assistant-turns"}

    def row_defaults(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_name(self.settings)}

    def open(self) -> LengthWorker:
        return LengthWorker(self.settings)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        summary: dict[str, Any] = {"tokenizer": tokenizer_name(self.settings)}
        for column in ("response_chars", "response_tokens"):
            mean = pc.mean(ok[column]).as_py() if ok.num_rows else None
            summary[f"mean_{column}"] = None if mean is None else round(mean, 2)
        return summary
