"""The worker side of the engine: one batch, read from the store, processed, written back.

:func:`run_batch` is the same for every stage and both ways of running:

- as a Prefect task on Ray (:data:`batch_task`, one task run per batch,
  ``<stage>-batch-NNNNN`` in the UI, retried by Prefect unless the cause is fatal);
- inside a Ray actor that holds a model (:class:`StageActor`).

It reads its rows (the spec names part files and row ranges), takes what the
cache and (with --retry-failed) the batch's earlier part already have,
processes the rest, and writes the cache file, then the part. Every input row
ends as exactly one output row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from gleaner.engine import cache
from gleaner.engine.batches import BatchSpec, read_segments
from gleaner.engine.failures import BatchUnavailable, FatalStageError, retry_unless_fatal
from gleaner.engine.stage import COST_COLUMNS, BatchWorker, Stage
from gleaner.llm.ratelimit import request_priority
from gleaner.store import Store


@dataclass
class StageJob:
    """What every batch of one stage run needs; picklable, no secrets (keys come from env)."""

    stage: Stage
    run_id: str
    store_url: str
    store_options: dict[str, Any]
    key: str
    cache_dir: str | None  # None: do not read or write the cross-run cache
    # a local-folder store: the node whose disk it is (a batch elsewhere would write there)
    store_node: str | None = None

    def store(self) -> Store:
        return Store(self.store_url, self.store_options)


def _without(table: pa.Table, ids: pa.Array) -> pa.Table:
    if len(ids) == 0 or table.num_rows == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table["id"], value_set=ids)))


def _as_cached(table: pa.Table) -> pa.Table:
    """Rows reused from another run: marked cached, and they cost nothing now."""
    for name in ("cached", *COST_COLUMNS):
        if name in table.column_names:
            index = table.column_names.index(name)
            value = True if name == "cached" else 0
            field = table.schema.field(name)
            table = table.set_column(index, field, pa.array([value] * table.num_rows, field.type))
    return table


def _check_complete(stage: Stage, index: int, todo: pa.Table, fresh: pa.Table) -> None:
    want = sorted(todo.column("id").to_pylist())
    got = sorted(fresh.column("id").to_pylist())
    if want != got:
        raise RuntimeError(f"{stage.name} batch {index:05d}: the stage returned other rows than "
                           f"it was given ({len(got)} for {len(want)}): a bug in the stage")


def _all_transient(fresh: pa.Table) -> bool:
    kinds = fresh.column("error_kind").to_pylist()
    status = fresh.column("status").to_pylist()
    return bool(kinds) and all(s == "failed" for s in status) and all(
        k in ("transient", "unreachable") for k in kinds)


def run_batch(job: StageJob, spec: BatchSpec, worker: BatchWorker) -> dict[str, Any]:
    """Do batch ``spec.index`` of ``job.stage``; returns its counts (never its rows)."""
    started = time.perf_counter()
    if job.store_node and _node_id() not in (None, job.store_node):
        raise FatalStageError(
            f"{job.stage.name}: a batch ran on Ray node {_node_id()}, but the store "
            f"{job.store_url} is a local folder on node {job.store_node}: a cluster that grew "
            "needs a store every node reaches (s3://..., see docs/operations.md)", "store")
    stage, store = job.stage, job.store()
    rows = read_segments(store, spec.segments, list(stage.input_columns))
    ids = rows.column("id").combine_chunks()
    kept = stage.schema.empty_table()
    if spec.retry_part:  # --retry-failed: the ok rows of the earlier part stay
        earlier = store.dataset([spec.retry_part], schema=stage.schema).to_table()
        kept = earlier.filter(pc.equal(earlier["status"], "ok"))
    reused = stage.schema.empty_table()
    if job.cache_dir and spec.cache_files:
        wanted = _without(pa.table({"id": ids}), kept.column("id").combine_chunks())["id"]
        reused = _as_cached(cache.read_cached(store, spec.cache_files,
                                              wanted.combine_chunks(), stage.schema))
    done = pa.concat_arrays([kept.column("id").combine_chunks().cast(pa.string()),
                             reused.column("id").combine_chunks().cast(pa.string())])
    todo = _without(rows, done)
    fresh = stage.schema.empty_table()
    if todo.num_rows:
        try:
            with request_priority(spec.index):  # a shared quota serves earlier batches first
                fresh = worker.process(todo)
        except FatalStageError:
            raise
        except Exception as error:
            from gleaner.llm.client import LLMError

            if isinstance(error, LLMError) and error.fatal:
                raise FatalStageError(str(error), error.kind) from None
            raise
        _check_complete(stage, spec.index, todo, fresh)
        if _all_transient(fresh):
            first = fresh.column("error")[0].as_py()
            raise BatchUnavailable(f"{stage.name} batch {spec.index:05d}: all {fresh.num_rows} "
                                   f"rows failed transiently; first: {first}")
        if job.cache_dir:
            cache.write_fresh(store, job.cache_dir, job.run_id, spec.index, fresh)
    table = pa.concat_tables([kept, reused, fresh.cast(stage.schema)])
    order = {example_id: i for i, example_id in enumerate(ids.to_pylist())}
    positions = [order[i] for i in table.column("id").to_pylist()]
    table = table.take(pa.array(sorted(range(len(positions)), key=positions.__getitem__)))
    store.write_part(job.run_id, stage.name, spec.index, table)
    counts = batch_counts(spec.index, table, time.perf_counter() - started)
    counts["device"] = getattr(worker, "device", None)  # a model worker's placement
    return counts


def batch_counts(index: int, table: pa.Table, seconds: float = 0.0) -> dict[str, Any]:
    status = table.column("status")
    fresh = table.filter(pc.invert(table["cached"]))
    counts = {"index": index, "rows": table.num_rows,
              "ok": pc.sum(pc.equal(status, "ok")).as_py() or 0,
              "failed": pc.sum(pc.equal(status, "failed")).as_py() or 0,
              "cached": table.num_rows - fresh.num_rows, "seconds": round(seconds, 3),
              "node": _node_id()}
    for name in ("attempts", "prompt_tokens", "completion_tokens"):
        if name in table.column_names:
            counts["requests" if name == "attempts" else name] = pc.sum(fresh[name]).as_py() or 0
    return counts


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (a plain call in a test)
        return None


@task(name="batch", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=retry_unless_fatal)
def batch_task(job: StageJob, spec: BatchSpec) -> dict[str, Any]:
    """One batch of a task stage (LLM calls): the unit of retry and of checkpointing."""
    worker = job.stage.open()
    try:
        return run_batch(job, spec, worker)
    finally:
        worker.close()


class StageActor:
    """A Ray actor holding one stage worker (a model, loaded once) for many batches."""

    def __init__(self, job: StageJob, threads: int = 0):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.job = job
        self.worker = job.stage.open()

    def ready(self) -> str | None:
        return _node_id()

    def run(self, spec: BatchSpec) -> dict[str, Any]:
        return run_batch(self.job, spec, self.worker)
