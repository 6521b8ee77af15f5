"""Selection: a global step over the whole pool (not batched), on the store's layout.

Joins every registered signal (rating, DEITA scores, and any other stage's
column) and the embeddings to the ingested ids, runs the configured selector,
and writes the manifest (stage ``select``: every example with ``selected`` and a
reason), the curated examples in selection order (stage ``curated``), the report
and the summary.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import Step
from gleaner.runs import record_run
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.deita import embed as embed_tasks
from gleaner.tasks.select import report as report_tasks
from gleaner.tasks.select.marks import load_marks, mark_stages
from gleaner.tasks.select.selectors import (
    Candidates,
    Manifest,
    SelectRequest,
    run_selector,
    selector,
)
from gleaner.tasks.select.signals import signals


def read_examples(store: Store, run_id: str, columns: list[str] | None = None) -> pa.Table:
    if not store.has_stage(run_id, layout.INGEST):
        raise FileNotFoundError(
            f"run {run_id!r} has no ingested examples in {store.url}; run gleaner ingest first"
        )
    return store.read_stage(run_id, layout.INGEST, columns=columns, schema=EXAMPLE_SCHEMA)


def load_candidates(store: Store, run_id: str, need_vectors: bool) -> Candidates:
    """Every ingested id, each registered signal the run has (null unless ok), the vectors."""
    ids = read_examples(store, run_id, ["id"]).column("id").to_pylist()
    where = {example_id: row for row, example_id in enumerate(ids)}
    columns: dict[str, np.ndarray] = {}
    label_columns: dict[str, list[list[str] | None]] = {}
    for signal in signals():
        if not store.has_stage(run_id, signal.stage):
            continue
        table = store.read_stage(run_id, signal.stage)
        if signal.column not in table.column_names:
            continue
        if signal.labels:
            labels: list[list[str] | None] = [None] * len(ids)
            for example_id, value, status in zip(table.column("id").to_pylist(),
                                                 table.column(signal.column).to_pylist(),
                                                 table.column("status").to_pylist(), strict=True):
                row = where.get(example_id)
                if row is not None and status == "ok" and value is not None:
                    labels[row] = list(value)
            label_columns[signal.name] = labels
            continue
        values = np.full(len(ids), np.nan)
        for example_id, value, status in zip(table.column("id").to_pylist(),
                                             table.column(signal.column).to_pylist(),
                                             table.column("status").to_pylist(), strict=True):
            row = where.get(example_id)
            if row is not None and status == "ok" and value is not None:
                values[row] = value
        columns[signal.name] = values
    data = Candidates(ids, columns, labels=label_columns, marks=load_marks(store, run_id, ids))
    if need_vectors and not ids:  # an empty pool (a generator that kept nothing)
        data.vectors, data.vector_ok = np.zeros((0, 1), np.float32), np.zeros(0, dtype=bool)
    elif need_vectors:
        if not store.has_stage(run_id, layout.EMBED):
            raise FileNotFoundError(f"run {run_id!r} has no embeddings; run gleaner embed first")
        table = store.read_stage(run_id, layout.EMBED)
        table = table.filter(pc.equal(table["status"], "ok"))
        vec_ids, matrix = embed_tasks.table_vectors(table)
        data.vectors = np.zeros((len(ids), matrix.shape[1] if matrix.size else 1), np.float32)
        data.vector_ok = np.zeros(len(ids), dtype=bool)
        for example_id, vector in zip(vec_ids, matrix, strict=True):
            row = where.get(example_id)
            if row is not None:
                data.vectors[row] = vector
                data.vector_ok[row] = True
    return data


def selected_count(store: Store, run_id: str) -> int:
    manifest = store.read_stage(run_id, layout.SELECT, columns=["selected"])
    return int(pc.sum(manifest["selected"]).as_py() or 0)


def select_manifest(data: Candidates, config: GleanerConfig, size: int | None = None) -> Manifest:
    s = config.select
    chosen = selector(s.selector)
    threshold = s.threshold
    if threshold is None and chosen.own_threshold:
        threshold = config.rate.threshold
    return run_selector(data, s.selector, SelectRequest(s.sort_by, s.size, s.tau, threshold,
                                                        s.seed, size, s.fraction,
                                                        s.min_label_frequency,
                                                        drop_marked=s.drop_marked))


def write_curated(store: Store, run_id: str, manifest: Manifest) -> int:
    """The selected examples, in selection order, as stage ``curated`` (EXAMPLE_SCHEMA)."""
    chosen = manifest.selected_ids
    pool = read_examples(store, run_id)
    picked = pool.filter(pc.is_in(pool["id"], value_set=pa.array(chosen, pa.string())))
    position = {example_id: i for i, example_id in enumerate(chosen)}
    order = np.argsort([position[i] for i in picked.column("id").to_pylist()], kind="stable")
    picked = picked.take(pa.array(order, pa.int64())) if picked.num_rows else picked
    store.clear_stage(run_id, layout.CURATED)
    store.write_part(run_id, layout.CURATED, 0, picked)
    return picked.num_rows


def input_stages(store: Store, run_id: str, need_vectors: bool) -> list[str]:
    """The stages a selection reads: the pool, every registered signal's stage it holds and
    every stage that marks examples to drop, the embeddings when the selector needs them."""
    stages = [layout.INGEST, *sorted({signal.stage for signal in signals()
                                      if store.has_stage(run_id, signal.stage)}
                                     | set(mark_stages(store, run_id)))]
    return [*stages, layout.EMBED] if need_vectors else stages


class SelectStep(Step):
    """Selection as one step: its key is the select settings; a change in the versions of the
    stages it reads selects again."""

    kind = layout.SELECT
    description = "the selection's report"
    force_hint = "--force (gleaner select; curate: another --run-id)"

    def __init__(self, store: Store, run_id: str, config: GleanerConfig,
                 size_of: str | None = None):
        self.config, self.size_of = config, size_of
        self.size = selected_count(store, size_of) if size_of else None
        self.need_vectors = selector(config.select.selector).needs_vectors
        self.versions = {stage: store.stage_version(run_id, stage)
                       for stage in input_stages(store, run_id, self.need_vectors)}
        self.report: Any = None
        self.paths: dict[str, str] = {}

    def settings(self) -> dict[str, Any]:
        return {"select": self.config.select.model_dump(mode="json"),
                "rate_threshold": self.config.rate.threshold, "size": self.size}

    def inputs(self) -> dict[str, Any]:
        return self.versions  # a refreshed signal or pool: selected again

    def done(self, store: Store, run_id: str) -> bool:
        return store.has_stage(run_id, layout.SELECT) and store.exists(
            layout.summary_path(store, run_id, layout.SELECT))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        summary, self.report, self.paths = select_examples(store, run_id, self.config,
                                                           size=self.size)
        self.store = store
        record_run(store, run_id, self.config, select=summary)
        return summary

    def markdown(self, summary: dict[str, Any]) -> str:
        from gleaner.tasks.select.publish import report_markdown

        return report_markdown(self.store, self.report, self.paths)


def select_examples(store: Store, run_id: str, config: GleanerConfig, size: int | None = None
                    ) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """Select (``size``: as many as another selection kept); write manifest, curated
    examples, report and summary. (summary, report, paths)"""
    started = time.perf_counter()
    data = load_candidates(store, run_id, need_vectors=selector(config.select.selector)
                           .needs_vectors)
    manifest = select_manifest(data, config, size)
    seconds = time.perf_counter() - started
    store.clear_stage(run_id, layout.SELECT)
    store.write_part(run_id, layout.SELECT, 0, manifest.to_table())
    curated = write_curated(store, run_id, manifest)
    report = report_tasks.build_report(manifest, data.columns, config.select,
                                       tau=config.select.tau)
    paths = report_tasks.write_report(store, run_id, report)
    summary: dict[str, Any] = {
        "run_id": run_id, "stage": layout.SELECT, "selector": config.select.selector,
        "sort_by": report.settings.get("sort_by"), "selected": report.counts["kept"],
        "examples": len(manifest), "reasons": report.counts,
        "too_similar": report.counts["too_similar"], "seconds": round(seconds, 2),
        "report": paths, "curated_rows": curated,
    }
    store.write_json(layout.summary_path(store, run_id, layout.SELECT), summary)
    return summary, report, paths
