"""A toy stage for the engine's own tests: it measures instructions, and does what it is told.

Its rows are ``id, length, version``. What it processed is appended to a log file
(one line per row), so a test can count what was computed again; files on disk
tell it which ids to fail (a failed row), which to crash on (the batch raises),
which to stop the whole stage on (a fatal error), and how slow to be.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from gleaner.config import StageSection
from gleaner.engine import FatalStageError, Stage, rows_table, stage_schema

TOY_SCHEMA = stage_schema(
    pa.field("length", pa.int64()),
    pa.field("version", pa.string(), nullable=False),
)


class ToyWorker:
    def __init__(self, stage: ToyStage):
        self.stage = stage

    def _ids(self, name: str) -> set[str]:
        path = Path(self.stage.control) / name
        return set(json.loads(path.read_text())) if path.exists() else set()

    def process(self, rows: pa.Table) -> pa.Table:
        fail, crash, fatal = self._ids("fail.json"), self._ids("crash.json"), self._ids(
            "fatal.json")
        ids = rows.column("id").to_pylist()
        if fatal & set(ids):
            raise FatalStageError("the toy's key was rejected", "rejected_key")
        if crash & set(ids):
            raise RuntimeError("the toy crashed on this batch")
        delay = float(os.environ.get("TOY_DELAY_S", "0") or 0)
        if delay:
            time.sleep(delay)
        out: list[dict[str, Any]] = []
        for row in rows.to_pylist():
            if row["id"] in fail:
                out.append({"id": row["id"], "version": self.stage.version, "status": "failed",
                            "error": "the toy could not measure it", "error_kind": "parse"})
            else:
                out.append({"id": row["id"], "length": len(row["instruction"]),
                            "version": self.stage.version, "status": "ok"})
        with open(Path(self.stage.control) / "processed.log", "a", encoding="utf-8") as log:
            log.write("".join(f"{row['id']}\n" for row in out))
        return rows_table(out, TOY_SCHEMA)

    def close(self) -> None:
        return None


class ToyStage(Stage):
    name = "toy"
    input_columns = ("id", "instruction")
    summary_columns = ("length",)

    def __init__(self, section: StageSection, control: str, version: str = "v1",
                 kind: str = "task"):
        super().__init__(section)
        self.control, self.version, self.kind = control, version, kind  # type: ignore[assignment]

    @property
    def schema(self) -> pa.Schema:
        return TOY_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"version": self.version}

    def row_defaults(self) -> dict[str, Any]:
        return {"version": self.version}

    def open(self) -> ToyWorker:
        return ToyWorker(self)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        lengths = [v for v in table.column("length").to_pylist() if v is not None]
        return {"total_length": sum(lengths)}


def processed(control: str | Path) -> list[str]:
    path = Path(control) / "processed.log"
    return path.read_text().split() if path.exists() else []
