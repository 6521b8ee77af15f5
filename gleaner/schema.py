"""The canonical example record: one Arrow schema every stage reads and writes.

Stages couple only through the example ``id``: a stable content hash of the
normalised example, so the same example has the same id in every run and in
every source it appears in.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("conversation", pa.list_(TURN_TYPE), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("field", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=True),
    ]
)

ROLES = ("system", "user", "assistant")


def normalise_text(text: str) -> str:
    """NFC, LF line endings, no surrounding whitespace: what 'the same text' means for ids."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def example_id(instruction: str, input: str, output: str, history: Sequence[Turn] = ()) -> str:
    """Stable content hash of a normalised example (sources and row numbers are not part of it)."""
    canonical = [
        normalise_text(instruction),
        normalise_text(input),
        normalise_text(output),
        [[t.role, normalise_text(t.content)] for t in history],
    ]
    blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass
class Example:
    """One instruction example. Multi-turn data keeps earlier turns in ``history``;
    ``instruction``/``input``/``output`` always hold the final exchange (LIMA's convention)."""

    source: str
    source_row: int
    instruction: str
    input: str = ""
    output: str = ""
    history: list[Turn] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    system: str = ""

    @property
    def id(self) -> str:
        history = ([Turn("system", self.system)] if self.system else []) + list(self.history)
        return example_id(self.instruction, self.input, self.output, history)

    def conversation(self) -> list[Turn]:
        """All turns in order; the final user turn carries instruction and input together."""
        final_user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        turns = [Turn("system", self.system)] if self.system else []
        turns += self.history
        turns.append(Turn("user", final_user))
        turns.append(Turn("assistant", self.output))
        return turns

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "source_row": self.source_row,
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "conversation": [{"role": t.role, "content": t.content} for t in self.conversation()],
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True, default=str),
        }


def examples_to_table(examples: Iterable[Example]) -> pa.Table:
    return rows_to_table([e.to_row() for e in examples], EXAMPLE_SCHEMA)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def user_assistant_pairs(conversation: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a conversation, in order: DEITA scores each turn."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for turn in conversation:
        if turn["role"] == "user":
            pending = turn["content"]
        elif turn["role"] == "assistant" and pending is not None:
            pairs.append((pending, turn["content"]))
            pending = None
    return pairs
