"""The driver side of the engine: plan, resume, cache, submit, count, report.

:func:`run_stage` runs one stage of one run, called inside a Prefect flow
whose task runner is prefect-ray's ``RayTaskRunner`` (Ray already up):

1. take the stage's lease (a second runner on the same run and stage refuses);
2. index the input (part footers and the id column: never the rows), cut it
   into batches, check the plan (same settings and batching, or refuse / --force);
3. skip batches whose part exists (resume), or redo only their failed rows
   (--retry-failed); ask the stage to resolve its settings once if work is
   pending (a probe request: a rejected key stops the stage right here);
4. look up the cross-run cache for the pending batches' ids;
5. submit the batches: task stages as Prefect tasks on Ray (a bounded window in
   flight, so a fatal error stops submission at once), actor stages on a pool of
   Ray actors holding the model; a batch that fails after its retries becomes
   failed rows;
6. summarise from the parts (counts add up, or it raises), write the summary,
   publish one markdown artifact, and fail the stage if its failed share is over
   the failure budget.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.config import GleanerConfig
from gleaner.engine import cache
from gleaner.engine.batches import BatchSpec, InputIndex
from gleaner.engine.failures import FatalStageError, check_budget, is_fatal
from gleaner.engine.lease import Lease
from gleaner.engine.plan import Plan, check_requested, check_resolved, write_plan
from gleaner.engine.stage import COST_COLUMNS, Context, LLMStage, Stage
from gleaner.engine.summary import publish_summary, stage_summary
from gleaner.engine.worker import StageActor, StageJob, batch_task
from gleaner.progress import progress
from gleaner.runtime import check_gpus
from gleaner.store import Store

log = logging.getLogger("gleaner.engine")
Done = Callable[[BatchSpec, "dict[str, Any] | None", "BaseException | None"], None]
Runner = Callable[["StageJob", "list[BatchSpec]", Done], "BaseException | None"]


# ---- the cluster can reach the store --------------------------------------------------------
def check_shared_store(store: Store) -> None:
    """Workers write their own parts: a local folder only works when they all run here."""
    if not store.is_local:
        return
    import ray

    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    remote = [n.get("NodeManagerAddress") for n in nodes if n.get("NodeManagerAddress") != here]
    if len(nodes) > 1 or remote:
        raise ValueError(
            f"the store {store.url} is a local folder, but the Ray cluster has {len(nodes)} "
            f"node(s){' on other hosts' if remote else ''}: workers on other nodes would write "
            "their parts to their own disks. Use a store every node reaches (s3://..., any "
            "shared fsspec URL); see docs/operations.md"
        )


def _driver_node() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# ---- submission ----------------------------------------------------------------------------
def _exception(future: Any) -> BaseException:
    try:
        future.result(raise_on_failure=True)
    except BaseException as error:  # the task's own exception
        return error
    return RuntimeError(str(future.state.message or future.state.type))


def task_slots(stage: Stage) -> int:
    """How many batches of a task stage Ray runs at once: its CPUs over a batch's."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // stage.resources.cpus))


def run_tasks(job: StageJob, specs: list[BatchSpec], on_done: Done) -> BaseException | None:
    """Prefect tasks on Ray, a bounded window in flight; returns the fatal error, if any."""
    from prefect.futures import as_completed
    from prefect_ray.context import remote_options

    stage, res = job.stage, job.stage.resources
    window = max(2, 2 * task_slots(stage))
    task = batch_task.with_options(name=f"{stage.name.split('/')[0]}-batch", retries=res.retries,
                                   retry_delay_seconds=res.retry_delay_s)
    label = artifact_key(stage.name, "batch")
    queue, inflight, fatal = deque(specs), {}, None
    while queue or inflight:
        while queue and fatal is None and len(inflight) < window:
            spec = queue.popleft()
            named = task.with_options(task_run_name=f"{label}-{spec.index:05d}")
            with remote_options(num_cpus=res.cpus, num_gpus=res.gpus or None):
                inflight[named.submit(job=job, spec=spec)] = spec
        if not inflight:
            break
        future = next(as_completed(list(inflight)))
        spec = inflight.pop(future)
        future.wait()
        if future.state.is_completed():
            on_done(spec, future.result(), None)
            continue
        error = _exception(future)
        on_done(spec, None, error)
        if is_fatal(error) and fatal is None:
            fatal = error
            queue.clear()  # stop submitting: nothing more can succeed
    return fatal


def run_actors(job: StageJob, specs: list[BatchSpec], on_done: Done) -> BaseException | None:
    """A pool of Ray actors holding the stage's model; retries a failed batch itself."""
    import ray

    res = job.stage.resources
    actor_class = ray.remote(StageActor).options(num_cpus=res.cpus, num_gpus=res.gpus)

    def start() -> Any:
        return actor_class.remote(job, max(1, int(res.cpus)))

    actors = [start() for _ in range(max(1, min(res.actors, len(specs))))]
    try:
        ray.get([a.ready.remote() for a in actors])
    except Exception as error:  # the model cannot load: nothing in this stage can run
        for actor in actors:
            ray.kill(actor)
        cause = getattr(error, "cause", None) or error
        raise FatalStageError(f"{job.stage.name}: the model could not be loaded: "
                              f"{type(cause).__name__}: {cause}", "model") from None
    queue, idle, inflight = deque(specs), list(actors), {}
    tries: Counter[int] = Counter()
    fatal: BaseException | None = None
    try:
        while queue or inflight:
            while queue and idle and fatal is None:
                actor, spec = idle.pop(), queue.popleft()
                inflight[actor.run.remote(spec)] = (actor, spec)
            if not inflight:
                break
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, spec = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:  # the actor died: a new one retries
                ray.kill(actor)
                actor = start()
                result, failure = None, error
            except ray.exceptions.RayTaskError as error:
                result, failure = None, error.cause or error
            else:
                failure = None
            idle.append(actor)
            if failure is None:
                on_done(spec, result, None)
                continue
            tries[spec.index] += 1
            if not is_fatal(failure) and tries[spec.index] <= res.retries:
                log.warning("%s batch %05d failed (%s); retrying", job.stage.name, spec.index,
                            failure)
                queue.append(spec)
                continue
            on_done(spec, None, failure)
            if is_fatal(failure) and fatal is None:
                fatal = failure
                queue.clear()
    finally:
        for actor in actors + [a for a, _ in inflight.values()]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
    return fatal


# ---- progress: one source for the terminal and the Prefect UI ---------------------------------
@contextlib.contextmanager
def stage_progress(stage: Stage, run_id: str, total: int, done: int, unit: str = "batch"
                   ) -> Iterator[Any]:
    artifact_id = None
    with contextlib.suppress(Exception):  # outside a flow run there is no UI to tell
        from prefect.artifacts import create_progress_artifact

        artifact_id = create_progress_artifact(
            progress=100.0 * done / max(1, total), key=artifact_key(stage.name, "progress", run_id),
            description=f"{stage.name} batches of run {run_id}")

    def tell_ui(finished: int, of: int | None) -> None:
        if artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            with contextlib.suppress(Exception):
                update_progress_artifact(artifact_id=artifact_id,
                                         progress=100.0 * finished / max(1, of or total))

    bar = progress(total, f"{stage.name} {run_id}", unit=unit, initial=done,
                   on_update=tell_ui, interval_s=2.0)
    try:
        yield bar
    finally:
        bar.close()


# ---- the stage run ---------------------------------------------------------------------------
def _failed_parts(store: Store, run_id: str, stage: str) -> dict[int, str]:
    """Finished parts that hold failed rows (for --retry-failed)."""
    out: dict[int, str] = {}
    for index, path in store.part_paths(store.stage_path(run_id, stage)).items():
        status = store.dataset([path]).to_table(columns=["status"]).column("status")
        if pc.any(pc.equal(status, "failed")).as_py():
            out[index] = path
    return out


@dataclass
class StageWork:
    """What a run of a stage has left: its plan, the batches, which are finished or to redo."""

    plan: Plan
    previous: dict[str, Any] | None  # the plan on record, when it matches
    bounds: list[tuple[int, int]]
    finished: set[int]
    retry: dict[int, str]  # --retry-failed: finished parts holding failed rows
    pending: list[int]


def stage_work(stage: Stage, store: Store, run_id: str, index: InputIndex,
               dry_run: bool = False) -> StageWork:
    """The batches a run of ``stage`` would do (``dry_run``: the cost plan; changes nothing,
    and a changed input of a stage that follows its input is a PlanMismatch)."""
    size = stage.resources.batch_size
    bounds = index.bounds(size)
    plan = Plan(stage.name, stage.requested(), {
        "input_stage": stage.input_stage, "rows": index.rows,
        "input": index.fingerprint(), "batch_size": size})
    previous = check_requested(store, run_id, plan, stage.follows_input and not dry_run)
    finished = store.finished_parts(run_id, stage.name)
    retry = _failed_parts(store, run_id, stage.name) if stage.section.retry_failed else {}
    pending = [i for i in range(len(bounds)) if i not in finished or i in retry]
    return StageWork(plan, previous, bounds, finished, retry, pending)


def cache_hits(stage: Stage, store: Store, work: StageWork, index: InputIndex
               ) -> cache.CacheLookup:
    """Which cache files hold rows of the pending batches (keyed by the plan's settings)."""
    section = stage.section
    if not (stage.cacheable and section.cache and not section.force):
        return cache.CacheLookup({}, {})
    directory = layout.cache_dir(store, stage.cache_name, work.plan.key)
    return cache.lookup(store, directory,
                        {i: index.batch_ids(*work.bounds[i]) for i in work.pending})


def pick_runner(stage: Stage, config: GleanerConfig) -> Runner:
    """How the batches run: Prefect tasks on Ray, Ray actors holding a model, or the
    provider's Batch API (an LLM stage whose endpoint says ``api: batch``)."""
    if isinstance(stage, LLMStage) and stage.uses_batch_api():
        from gleaner.engine.batch_api import batch_runner

        return batch_runner(config.batch_api)
    return run_actors if stage.kind == "actor" else run_tasks


def run_stage(stage: Stage, config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """Run ``stage`` over its input for ``run_id``; returns (and stores) its summary."""
    started = time.perf_counter()
    store = Store(config.store.url, config.store.options)
    section = stage.section
    check_shared_store(store)
    check_gpus(config, stage.resources.gpus, f"{stage.name}.resources.gpus")
    # the buckets' actors start (a process each: a second or more) while the plan is made
    # and the probe is sent, not while the first batches wait for them
    holder = stage_limiters(stage)
    with Lease(store, run_id, stage.name):
        if section.force:
            store.clear_stage(run_id, stage.name)
        index = InputIndex.build(store, run_id, stage.input_stage)
        stage.check_input(index.rows)
        work = stage_work(stage, store, run_id, index)
        plan, previous, bounds, pending = work.plan, work.previous, work.bounds, work.pending
        finished, retry = work.finished, work.retry
        ctx = Context(store, run_id, config)
        if pending:
            plan.resolved = stage.resolve(ctx)
            check_resolved(previous, plan, run_id)
        else:
            plan.resolved = (previous or {}).get("resolved") or stage.requested()
            stage.adopt(plan.resolved)
        write_plan(store, run_id, plan)
        directory = layout.cache_dir(store, stage.cache_name, plan.key)
        lookup = cache_hits(stage, store, work, index)
        specs = [BatchSpec(i, index.segments(*bounds[i]), bounds[i][1] - bounds[i][0],
                           lookup.files.get(i, []), retry.get(i)) for i in pending]
        log.info("%s of run %s: %d rows in %d batches (%d finished earlier, %d to retry, %d rows "
                 "from the cache)", stage.name, run_id, index.rows, len(bounds),
                 len(finished) - len(retry), len(retry), lookup.total)
        cap_limiter_shares(stage, len(specs))
        # fresh ok rows go to the cache whenever it is on; --force only stops reading it
        job = StageJob(stage, run_id, config.store.url, dict(config.store.options), plan.key,
                       directory if stage.cacheable and section.cache else None,
                       _driver_node() if store.is_local else None)
        fatal, results = _execute(stage, job, specs, index, bounds, store, run_id,
                                  done=len(bounds) - len(pending),
                                  runner=pick_runner(stage, config))
        summary = summarize(stage, store, run_id, config, index, plan, ctx, results,
                            batches=len(bounds), resumed=len(bounds) - len(pending),
                            seconds=time.perf_counter() - started, fatal=fatal)
    del holder  # every batch is done: the limiter actors may go
    if fatal is not None:
        raise FatalStageError(f"{stage.name} stopped: {fatal}",
                              getattr(fatal, "kind", "fatal")) from None
    check_budget(stage.name, summary["failed"], summary["examples"], section.max_failed_share)
    return summary


def _execute(stage: Stage, job: StageJob, specs: list[BatchSpec], index: InputIndex,
             bounds: list[tuple[int, int]], store: Store, run_id: str, done: int,
             runner: Runner | None = None
             ) -> tuple[BaseException | None, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    if not specs:
        return None, results
    with stage_progress(stage, run_id, len(bounds), done) as bar:

        def on_done(spec: BatchSpec, result: dict[str, Any] | None,
                    error: BaseException | None) -> None:
            bar.update(1)
            if result is not None:
                results.append(result)
                return
            retries = stage.resources.retries
            message = f"batch failed after {retries} retries: {type(error).__name__}: {error}"
            message = message[:1000]
            log.error("%s batch %05d failed after its retries: %s", stage.name, spec.index,
                      message)
            if is_fatal(error) or spec.retry_part:
                return  # fatal: the batch stays pending; retry: its earlier part stands
            ids = index.batch_ids(*bounds[spec.index]).to_pylist()
            store.write_part(run_id, stage.name, spec.index,
                             stage.failed_rows(ids, message, "task"))
            results.append({"index": spec.index, "failed_batch": True})

        runner = runner or (run_actors if stage.kind == "actor" else run_tasks)
        fatal = runner(job, specs, on_done)
    return fatal, results


def stage_limiters(stage: Stage, shares: int | None = None) -> list[Any]:
    """The cluster-wide buckets of an LLM stage's endpoints+models; the driver owns them.

    ``shares``: how many workers pace themselves at an even share of the limits until a
    new bucket's actor answers (default: the batches Ray runs at once)."""
    if not isinstance(stage, LLMStage):
        return []
    from gleaner.llm.ratelimit import ensure_rate_limiter, limiter_name

    handles, stage.limiters = [], {}
    for endpoint in stage.endpoints():
        if endpoint.rpm or endpoint.tpm:
            name = limiter_name(endpoint.base_url or "", endpoint.model)
            if shares is None:
                shares = task_slots(stage) if stage.kind == "task" else 1
            stage.limiters[name] = shares
            handles.append(ensure_rate_limiter(name, endpoint.rpm, endpoint.tpm, shares=shares))
    return handles


def cap_limiter_shares(stage: Stage, batches: int) -> None:
    """While a bucket's actor starts, the batches running at once share its limits: no
    more of them than there are batches to run (fewer shares pace faster each)."""
    if isinstance(stage, LLMStage):
        stage.limiters = {name: min(shares, max(1, batches))
                          for name, shares in stage.limiters.items()}


def summarize(stage: Stage, store: Store, run_id: str, config: GleanerConfig, index: InputIndex,
              plan: Plan, ctx: Context, results: list[dict[str, Any]], *, batches: int,
              resumed: int, seconds: float, fatal: BaseException | None) -> dict[str, Any]:
    """Counts from the parts, the engine's fields, the stage's own; written and published."""
    columns = ["id", "status", "error_kind", "cached"]
    columns += [c for c in (*COST_COLUMNS, *stage.summary_columns)
                if c in stage.schema.names and c not in columns]
    table = (store.read_stage(run_id, stage.name, columns=columns, schema=stage.schema)
             if store.has_stage(run_id, stage.name) else stage.schema.empty_table())
    fields: dict[str, Any] = {"input_stage": stage.input_stage}
    if isinstance(stage, LLMStage):  # rows the Batch API answered are billed at its price
        from gleaner.engine.batch_api import batch_usage

        fields["batch_api"] = batch_usage(store, run_id, stage.name)
    price = stage.price(config) if isinstance(stage, LLMStage) else None
    summary = stage_summary(stage, run_id, plan, table, ctx.usage, price, examples=index.rows,
                            fatal=fatal, **fields)
    nodes = Counter(r.get("node") for r in results if r.get("node"))
    devices = Counter(r.get("device") for r in results if r.get("device"))
    summary.update(
        batches=batches, batches_resumed=resumed, batches_submitted=len(results),
        # rows this run made (not read back from the cache, not finished before)
        made=sum(r.get("rows", 0) - r.get("cached", 0) for r in results),
        batches_failed=sum(1 for r in results if r.get("failed_batch")),
        batch_seconds=round(sum(r.get("seconds", 0.0) for r in results), 3),
        nodes=dict(nodes), seconds=round(seconds, 3),
        max_failed_share=stage.section.max_failed_share,  # over it, the stage failed (gleaner runs)
        **({"devices": dict(devices)} if devices else {}))
    summary.update(stage.summarize(table))  # an empty stage too: its fields are all there
    store.write_json(layout.summary_path(store, run_id, stage.name), summary)
    publish_summary(stage, run_id, summary)
    return summary


def read_summary(store: Store, run_id: str, stage: str) -> dict[str, Any] | None:
    path = layout.summary_path(store, run_id, stage)
    return store.read_json(path) if store.exists(path) else None

