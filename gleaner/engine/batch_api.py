"""The engine's second way to run an LLM stage: the provider's Batch API, at half the price.

``run_stage`` picks it (:func:`batch_runner`) for an LLM stage one of whose
endpoints says ``api: batch``; everything else of the engine — plan, parts,
cache, failed rows, failure budget, lease, summary — is the same. Round by round:

1. every pending batch of rows is replayed (the engine's own ``run_batch`` with a
   :class:`~gleaner.engine.replay.ReplayWorker`): a batch whose rows all have their
   answers is written as its part (and cache file), exactly as the synchronous path
   writes it; the others name the requests they still need;
2. those requests become input files, written and recorded in the store before
   anything is sent (:func:`~gleaner.engine.batch_state.prepare`);
3. one Prefect task (retried on errors that pass) uploads them, creates the
   batches, polls them every ``batch_api.poll_interval_s`` and reads back their
   output and error files; a progress artifact and a bar show each batch;

until every row is made or failed with its error. A rerun after a kill resumes
the recorded batches (polls them, never sends them again); requests the provider
lost are sent again (``batch_api.resubmits``, as another batch or synchronously:
``batch_api.retries_via``) and then fail with the provider's reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import posixpath
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.config import BatchAPIConfig
from gleaner.engine.batch_state import (
    AnswerIndex,
    BatchRecord,
    BatchState,
    collect,
    prepare,
    submit,
    update,
)
from gleaner.engine.batches import BatchSpec
from gleaner.engine.failures import FatalStageError, is_fatal, retry_unless_fatal
from gleaner.engine.replay import BatchRequest, Pending, Policy, ReplayWorker
from gleaner.engine.worker import StageJob, run_batch
from gleaner.llm.batches import TERMINAL, BatchAPI
from gleaner.llm.client import LLMError
from gleaner.progress import progress
from gleaner.store import Store

log = logging.getLogger("gleaner.batch_api")
Done = Callable[[BatchSpec, "dict[str, Any] | None", "BaseException | None"], None]
USAGE_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                          pa.field("requests", pa.int64(), nullable=False),
                          pa.field("prompt_tokens", pa.int64(), nullable=False),
                          pa.field("completion_tokens", pa.int64(), nullable=False)])


def batch_runner(settings: BatchAPIConfig) -> Callable[[StageJob, list[BatchSpec], Done],
                                                       BaseException | None]:
    """The runner ``run_stage`` uses for a stage on the Batch API."""
    return functools.partial(run_batch_api, settings=settings)


def run_batch_api(job: StageJob, specs: list[BatchSpec], on_done: Done,
                  settings: BatchAPIConfig) -> BaseException | None:
    """Rounds of replay, prepare and wait until every spec is written; returns a fatal error."""
    stage, store = job.stage, job.store()
    for endpoint in stage.endpoints():
        if endpoint.local_server or not endpoint.base_url:
            return FatalStageError(f"{stage.name}: api: batch needs a provider with a Batch API "
                                   "(/v1/files, /v1/batches); the offline llama.cpp server has "
                                   "none: configure the endpoint's base_url", "batch_api")
    state = BatchState.load(store, job.run_id, stage.name)
    if state.finished:  # a new run of the stage; a killed one goes on with its own answers
        state.invocation, state.finished = state.invocation + 1, False
        state.save(store)
    remaining, fatal = list(specs), None
    while remaining:
        fatal = wait_for_batches(job, settings)
        if fatal is not None:
            return fatal
        state = BatchState.load(store, job.run_id, stage.name)
        index = AnswerIndex(store, state)
        policy = Policy(settings.resubmits, settings.retries_via,
                        can_submit=state.rounds < settings.max_rounds)
        wanted: list[BatchRequest] = []
        still: list[BatchSpec] = []
        for spec in remaining:
            outcome = replay(job, spec, index, policy, state.invocation)
            if isinstance(outcome, Pending):
                wanted += outcome.requests
                still.append(spec)
                continue
            counts, error = outcome
            on_done(spec, counts, error)
            if is_fatal(error):
                return error  # as on the synchronous path: nothing more can succeed
        remaining = still
        if remaining:
            if not wanted:
                raise RuntimeError(f"{stage.name}: {len(remaining)} batches wait for answers "
                                   "but need no request (a bug: please report it)")
            made = prepare(store, state, wanted, settings)
            log.info("%s round %d: %d requests in %d batch files for %d batches of rows",
                     stage.name, state.rounds, len(wanted), len(made), len(remaining))
    state = BatchState.load(store, job.run_id, stage.name)
    state.finished = True
    state.save(store)
    return None


def replay(job: StageJob, spec: BatchSpec, index: AnswerIndex, policy: Policy, invocation: int
           ) -> Pending | tuple[dict[str, Any] | None, BaseException | None]:
    """One batch of rows against the answers so far: written (counts), or Pending."""
    store = job.store()
    # --retry-failed: the failed rows of a finished part are asked again, not replayed
    since = invocation if spec.retry_part else 0

    def record_usage(ids: list[str], rows: list[dict[str, Any]]) -> None:
        write_usage(store, job.run_id, job.stage.name, spec.index, ids, rows)

    worker = ReplayWorker(job.stage, lambda ids: index.lookup(ids, since), policy, record_usage)
    try:
        counts = run_batch(job, spec, worker)
    except Pending as pending:
        return pending
    except Exception as error:  # the engine writes its rows as failed, or stops if fatal
        return None, error
    finally:
        worker.close()
    counts["batch_api"] = {"rows": len(worker.usage_rows),
                           "requests": sum(r["requests"] for r in worker.usage_rows)}
    return counts, None


def write_usage(store: Store, run_id: str, stage: str, index: int, redone: list[str],
                rows: list[dict[str, Any]]) -> None:
    """Which rows of part ``index`` the Batch API answered (kept rows keep their record)."""
    path = layout.batch_usage_path(store, run_id, stage, index)
    table = pa.Table.from_pylist(rows, schema=USAGE_SCHEMA)
    if store.exists(path):
        earlier = store.dataset([path], schema=USAGE_SCHEMA).to_table()
        kept = earlier.filter(pc.invert(pc.is_in(earlier["id"], pa.array(redone, pa.string()))))
        table = pa.concat_tables([kept, table])
    if table.num_rows:
        store.write_table(path, table)
    else:
        store.delete(path)


# ---- waiting for the provider (a Prefect task) -------------------------------------------------
def wait_for_batches(job: StageJob, settings: BatchAPIConfig) -> BaseException | None:
    """Submit what is prepared, poll until every batch is read back; the fatal error, if any."""
    store = job.store()
    state = BatchState.load(store, job.run_id, job.stage.name)
    if not state.uncollected():
        return None
    named = wait_task.with_options(
        task_run_name=f"{artifact_key(job.stage.name, 'batch-api')}-round-{state.rounds}",
        retries=settings.poll_retries, retry_delay_seconds=settings.poll_interval_s)
    try:
        named(job=job, settings=settings)
    except FatalStageError as error:
        return error
    except Exception as error:  # polling failed after its retries: the batches still run
        return FatalStageError(f"{job.stage.name}: the Batch API could not be polled "
                               f"({type(error).__name__}: {error}); rerun to resume polling "
                               "the same batches", "batch_api")
    return None


@task(name="batch-api-wait", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=retry_unless_fatal)
def wait_task(job: StageJob, settings: BatchAPIConfig) -> int:
    """Upload, create, poll and read back every batch not yet read back (resumable)."""
    store = job.store()
    state = BatchState.load(store, job.run_id, job.stage.name)
    apis: dict[str, BatchAPI] = {}
    watch = BatchProgress(job.stage.name, job.run_id, state.uncollected())
    try:
        while True:
            for record in state.uncollected():
                api = apis.get(_endpoint_key(record)) or apis.setdefault(
                    _endpoint_key(record), BatchAPI(record.endpoint_config()))
                _advance(store, state, record, api, settings)
            watch.show(state)
            if not state.uncollected():
                return len(state.batches)
            time.sleep(settings.poll_interval_s)
    except LLMError as error:
        if error.fatal:
            raise FatalStageError(f"{job.stage.name}: {error}", error.kind) from None
        raise
    finally:
        watch.close()
        for api in apis.values():
            api.close()


def _endpoint_key(record: BatchRecord) -> str:
    return f"{record.endpoint.get('base_url')}|{record.endpoint.get('api_key_env')}"


def _advance(store: Store, state: BatchState, record: BatchRecord, api: BatchAPI,
             settings: BatchAPIConfig) -> None:
    """One step for one batch: submit it, ask how it is, or read it back once finished."""
    if record.batch_id is None and record.status != "rejected":  # rejected: collected below
        try:
            submit(store, state, record, api, settings.completion_window)
        except LLMError as error:
            if error.fatal or error.transient:
                raise
            record.status, record.errors = "rejected", [str(error)]  # its requests are lost
            state.save(store)
    elif record.status not in (*TERMINAL, "rejected"):
        update(record, api.retrieve(record.batch_id))
        state.save(store)
    if record.status in (*TERMINAL, "rejected"):
        collect(store, state, record, api)
        log.info("%s batch %s (%s): %d answered, %d lost", state.stage, record.batch_id,
                 record.status, record.answered, record.lost)


class BatchProgress:
    """Each batch's status and counts: a bar in the terminal, artifacts in the Prefect UI."""

    def __init__(self, stage: str, run_id: str, records: list[BatchRecord]):
        self.stage, self.run_id = stage, run_id
        self.numbers = {r.number for r in records}
        self.total = sum(r.requests for r in records)
        self.done = 0
        self.shown: list[tuple[Any, ...]] = []
        self.key = artifact_key(stage, "batch-api", run_id)
        from gleaner.progress import prefect_progress_listener

        ui = prefect_progress_listener(self.key + "-progress",
                                       f"{stage}: Batch API requests finished")

        def listener(done: int, total: int | None) -> None:
            with contextlib.suppress(Exception):  # outside a flow run there is no UI to tell
                ui(done, total)

        self.bar = progress(self.total, f"{stage} batch API", unit="req", interval_s=5.0,
                            on_update=listener)

    def show(self, state: BatchState) -> None:
        mine = [r for r in state.batches if r.number in self.numbers]
        done = sum(r.requests if r.collected else
                   r.counts.get("completed", 0) + r.counts.get("failed", 0) for r in mine)
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done
        rows = [(r.number, r.round, r.batch_id, r.status, r.counts.get("completed", 0),
                 r.counts.get("failed", 0), r.requests, r.answered, r.lost) for r in mine]
        if rows != self.shown:
            self.shown = rows
            with contextlib.suppress(Exception):
                from prefect.artifacts import create_table_artifact

                names = ("file", "round", "batch", "status", "completed", "failed", "requests",
                         "answered", "lost")
                create_table_artifact(key=self.key, table=[dict(zip(names, r, strict=True))
                                                           for r in rows],
                                      description=f"{self.stage}: Batch API batches")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bar.close()


# ---- the summary's share ----------------------------------------------------------------------
def batch_usage(store: Store, run_id: str, stage: str) -> dict[str, Any] | None:
    """What went through the Batch API (None when nothing did): which examples (the usage
    files list them), requests, tokens (billed at the batch price), batches and rounds."""
    state_path = layout.batch_state_path(store, run_id, stage)
    if not store.exists(state_path):
        return None
    state = BatchState.load(store, run_id, stage)
    folder = posixpath.dirname(layout.batch_usage_path(store, run_id, stage, 0))
    try:
        files = sorted(p for p in store.fs.ls(folder, detail=False, refresh=True)
                       if p.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    table = (store.dataset(files, schema=USAGE_SCHEMA).to_table() if files
             else USAGE_SCHEMA.empty_table())

    def total(column: str) -> int:
        return int(pc.sum(table[column]).as_py() or 0) if table.num_rows else 0

    return {"examples": table.num_rows, "requests": total("requests"),
            "prompt_tokens": total("prompt_tokens"),
            "completion_tokens": total("completion_tokens"),
            "batches": len(state.batches), "rounds": state.rounds,
            "sent": state.requests(), "answered": sum(r.answered for r in state.batches),
            "lost": sum(r.lost for r in state.batches),
            "batch_ids": [r.batch_id for r in state.batches if r.batch_id][:100],
            "examples_file": store.uri(folder)}

