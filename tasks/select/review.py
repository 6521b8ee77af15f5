"""A person's review of single examples: exclusions and flags, an append-only record in the run.

``runs/<id>/review/part-NNNNN.parquet``: one small part per action (``gleaner view`` writes
one when a person excludes, includes again, flags or unflags examples), each row saying
which example, what, who, when and why. Parts are created exclusively (a second writer
takes the next number), so nothing written is ever rewritten.

Selection reads the exclusions as marks (``tasks/select/marks.py``): an excluded example
gets the manifest reason ``excluded`` before any selector runs, so the next curated set
and published version leave it out. :func:`exclusion_records` is what a published
version's provenance includes: who excluded what, when and why.
"""

from __future__ import annotations

import datetime as dt
import getpass
import io
import posixpath
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gleaner.store import Store, part_name

REVIEW = "review"  # the stage folder of the record
EXCLUDED = "excluded"  # the manifest reason of an excluded example
ACTIONS = ("exclude", "include", "flag", "unflag")  # include / unflag undo the other two

REVIEW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("who", pa.string(), nullable=False),
    pa.field("why", pa.string(), nullable=False),
    pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # always ok: read like a stage's rows
])


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        return "unknown"


def record_review(store: Store, run_id: str, ids: Sequence[str], action: str,
                  why: str = "", who: str | None = None) -> dict[str, Any]:
    """Append one action on ``ids`` to the run's review record; returns what was written."""
    if action not in ACTIONS:
        raise ValueError(f"review action must be one of {', '.join(ACTIONS)}, got {action!r}")
    ids = [str(i) for i in dict.fromkeys(ids)]
    if not ids:
        raise ValueError("no example ids to review")
    who = (who or "").strip() or default_reviewer()
    at = dt.datetime.now(dt.UTC)
    table = pa.table({"id": ids, "action": [action] * len(ids), "who": [who] * len(ids),
                      "why": [why.strip()] * len(ids), "at": [at] * len(ids),
                      "status": ["ok"] * len(ids)}, schema=REVIEW_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    directory = store.stage_path(run_id, REVIEW)
    number = max(store.part_paths(directory), default=-1) + 1
    while not store.create_exclusive(posixpath.join(directory, part_name(number)),
                                     buffer.getvalue()):
        number += 1  # another reviewer wrote this number first: take the next one
    return {"part": number, "ids": ids, "action": action, "who": who, "why": why.strip(),
            "at": at.isoformat()}


def review_log(store: Store, run_id: str) -> pa.Table:
    """Every action ever recorded, in the order written (an empty table when none)."""
    parts = store.part_paths(store.stage_path(run_id, REVIEW))
    if not parts:
        return REVIEW_SCHEMA.empty_table()
    tables = [pq.read_table(path, filesystem=store.fs, schema=REVIEW_SCHEMA)
              for path in parts.values()]
    return pa.concat_tables(tables)


def _current(store: Store, run_id: str, on: str, off: str) -> list[dict[str, Any]]:
    state: dict[str, dict[str, Any] | None] = {}
    for row in review_log(store, run_id).to_pylist():
        if row["action"] == on:
            state[row["id"]] = {"id": row["id"], "who": row["who"], "why": row["why"],
                                "at": row["at"].isoformat()}
        elif row["action"] == off:
            state[row["id"]] = None
    return [record for record in state.values() if record is not None]


def exclusion_records(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The examples excluded now (the last action on each is ``exclude``): id, who, why, at.

    What a published version's provenance records."""
    return _current(store, run_id, "exclude", "include")


def flag_records(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The examples flagged now (kept in selection; a note for people): id, who, why, at."""
    return _current(store, run_id, "flag", "unflag")
