"""The examples pool stages marked to leave out of selection (gleaner.engine.catalog.Drop).

Every registered pool stage with a ``drop`` (decontamination, near-duplicate removal) names
the stage whose rows hold its mark, the boolean column and the manifest reason. Selection
reads them here, by example id, before any selector runs: an example marked by more than one
stage takes the first one's reason (registry order), so every example still has one reason
and the counts add up to the pool. A person's exclusion (``gleaner view``, the run's review
record: tasks/select/review.py) comes first, as reason ``excluded``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.catalog import drops
from gleaner.store import Store
from gleaner.tasks.select.review import EXCLUDED, REVIEW, exclusion_records
from gleaner.tasks.select.selectors import Candidates, SelectRequest, without_marked


def mark_stages(store: Store, run_id: str) -> list[str]:
    """The stages of the run that hold marks (what a selection also depends on)."""
    stages = [drop.stage for drop in drops() if store.has_stage(run_id, drop.stage)]
    return [REVIEW, *stages] if store.has_stage(run_id, REVIEW) else stages


def load_marks(store: Store, run_id: str, ids: Sequence[str]) -> list[str | None] | None:
    """Per example (in ``ids`` order): ``reason`` or ``reason:<detail>`` where a stage marked
    it (ok rows only), else None; None when the run holds no marks at all."""
    where = {example_id: row for row, example_id in enumerate(ids)}
    marks: list[str | None] | None = None
    excluded = exclusion_records(store, run_id)
    if excluded:
        marks = [None] * len(ids)
        for record in excluded:
            row = where.get(record["id"])
            if row is not None:
                marks[row] = EXCLUDED
    for drop in drops():
        if not store.has_stage(run_id, drop.stage):
            continue
        columns = ["id", "status", drop.column] + ([drop.detail] if drop.detail else [])
        table = store.read_stage(run_id, drop.stage, columns=columns)
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                     pc.fill_null(table[drop.column], False)))
        marks = marks if marks is not None else [None] * len(ids)
        details = (table.column(drop.detail).to_pylist() if drop.detail
                   else [None] * table.num_rows)
        for example_id, detail in zip(table.column("id").to_pylist(), details, strict=True):
            row = where.get(example_id)
            if row is not None and marks[row] is None:
                marks[row] = f"{drop.reason}:{detail}" if detail else drop.reason
    return marks


def check_pool_left(store: Store, run_id: str, config: GleanerConfig) -> None:
    """Raise :class:`NothingLeft` when every ingested example is marked (and marks drop)."""
    if not config.select.drop_marked:
        return
    ids = store.read_stage(run_id, layout.INGEST, columns=["id"]).column("id").to_pylist()
    marks = load_marks(store, run_id, ids)
    if ids and marks is not None and all(marks):
        without_marked(Candidates(ids, {}, marks=marks), config.select.selector,
                       SelectRequest(None, 0, 0.0, None, 0))  # raises, saying why
