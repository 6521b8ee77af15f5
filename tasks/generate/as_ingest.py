"""Made examples written as a run's ``ingest`` stage: rate, score, embed and select read them.

Generation (self-instruct) and regeneration (``--into``) end here: the rows go to
``runs/<id>/ingest`` in EXAMPLE_SCHEMA through ingest's own part writer, a row that cannot be
an example to ``quarantine`` with its reason, a repeated id to ``duplicates``, and the summary
has ingest's shape (``read = kept + quarantined + duplicates``, per-source counts) plus
``made_by``. The stage is derived data: it is rewritten whole from the maker's parts, and a
run whose ingest another maker wrote (``gleaner ingest`` of files, another generator) is
refused rather than overwritten.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gleaner import layout
from gleaner.schema import EXAMPLE_SCHEMA, QUARANTINE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import DUPLICATE_SCHEMA, STAGES, PartWriter

SAMPLES = 10


class IngestOwned(ValueError):
    """The run's ingest was written by something else: it is not ours to replace."""


def ingest_maker(store: Store, run_id: str) -> str | None:
    """Who wrote the run's ingest: ``ingest`` (files), a maker's name, or None (nothing yet)."""
    path = layout.summary_path(store, run_id, layout.INGEST)
    if store.exists(path):
        return str(store.read_json(path).get("made_by") or "ingest")
    return "unknown" if store.has_stage(run_id, layout.INGEST) else None


def check_ingest_free(store: Store, run_id: str, maker: str) -> None:
    """Refuse to write ``run_id``'s ingest when another maker's examples are there."""
    found = ingest_maker(store, run_id)
    if found not in (None, maker):
        raise IngestOwned(
            f"run {run_id!r} already holds examples made by {found!r}, not by {maker!r}; "
            "use another --run-id (each made set is a run of its own)")


@dataclass
class Made:
    """Rows for one run's ingest, from one maker."""

    maker: str
    examples: list[dict[str, Any]] = field(default_factory=list)  # EXAMPLE_SCHEMA rows
    quarantined: list[dict[str, Any]] = field(default_factory=list)  # QUARANTINE_SCHEMA rows
    reasons: Counter[str] = field(default_factory=Counter)  # quarantine reason codes

    def quarantine(self, source: str, row: int, field_name: str | None, code: str,
                   reason: str) -> None:
        self.quarantined.append({"source": source, "source_row": row, "field": field_name,
                                 "reason": reason, "raw": None})
        self.reasons[code] += 1


def _write(store: Store, run_id: str, stage: str, schema: Any, rows: Iterable[dict[str, Any]],
           batch_rows: int) -> PartWriter:
    writer = PartWriter(store, run_id, stage, schema, batch_rows)
    for row in rows:
        writer.append(row)
    writer.flush()
    return writer


def write_ingest(store: Store, run_id: str, made: Made, *, source: str,
                 settings: dict[str, Any], batch_rows: int = 50_000,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace ``run_id``'s ingest with ``made``; returns (and stores) ingest's summary."""
    started = time.perf_counter()
    check_ingest_free(store, run_id, made.maker)
    path = layout.summary_path(store, run_id, layout.INGEST)
    for stage in STAGES:
        store.clear_stage(run_id, stage)
    # claimed before the parts: a rewrite killed half-way is still ours to redo, nobody else's
    store.write_json(path, {"run_id": run_id, "stage": layout.INGEST, "made_by": made.maker,
                            "status": "writing"})
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    for row in made.examples:
        if row["id"] in seen:
            duplicates.append({"source": row["source"], "source_row": row["source_row"],
                               "id": row["id"]})
            continue
        seen.add(row["id"])
        kept.append(row)
    writer = _write(store, run_id, layout.INGEST, EXAMPLE_SCHEMA, kept, batch_rows)
    if not writer.parts:  # nothing made is a result too: an empty stage, not a missing one
        store.write_part(run_id, layout.INGEST, 0, EXAMPLE_SCHEMA.empty_table())
    held = _write(store, run_id, layout.QUARANTINE, QUARANTINE_SCHEMA, made.quarantined,
                  batch_rows)
    _write(store, run_id, layout.DUPLICATES, DUPLICATE_SCHEMA, duplicates, batch_rows)
    read = len(made.examples) + len(made.quarantined)
    counts = {"read": read, "kept": len(kept), "quarantined": len(made.quarantined),
              "duplicates": len(duplicates), "reasons": dict(sorted(made.reasons.items()))}
    summary = {
        "run_id": run_id, "stage": layout.INGEST, "made_by": made.maker, **counts,
        "sources": [{"source": source, "kind": made.maker, "format": made.maker, **counts}],
        "source_files": [source], "parts": writer.parts, "quarantine_parts": held.parts,
        "output": store.uri(store.stage_path(run_id, layout.INGEST)),
        "quarantine_output": store.uri(store.stage_path(run_id, layout.QUARANTINE)),
        "duplicates_output": store.uri(store.stage_path(run_id, layout.DUPLICATES)),
        "quarantine_samples": [{k: q[k] for k in ("source", "source_row", "field", "reason")}
                               for q in made.quarantined[:SAMPLES]],
        "settings": settings, "seconds": round(time.perf_counter() - started, 3),
        **(extra or {}),
    }
    if summary["read"] != summary["kept"] + summary["quarantined"] + summary["duplicates"]:
        raise AssertionError(f"made-ingest counts do not add up: {counts}")  # a bug, never data
    store.write_json(path, summary)
    return summary
