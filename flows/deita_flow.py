"""DEITA's stages as flows: score (Prefect tasks on Ray), embed (a Ray actor pool), select.

- ``score_flow``: the ingested examples cut into fixed batches; each batch a
  Prefect task on prefect-ray's RayTaskRunner (the scorer model is loaded once
  per Ray worker), writing part <i> of stage ``score``. Finished parts are
  skipped on a rerun; a batch that fails after its retries is written as
  ``failed`` rows with the error, so every example is accounted for.
- ``embed_flow``: batches of similar length sent through a
  :class:`ray.util.ActorPool` of encoder actors (model loaded once per actor,
  GPU actors when ``embed.num_gpus`` > 0); each batch becomes part <i> of stage
  ``embed`` as it finishes; vectors are cached across runs by (example id, model).
- ``select_flow``: joins rating, scores and embeddings by id, runs the
  configured selector (optionally after AlpaGasus' threshold), writes the
  manifest (stage ``select``), the curated examples (stage ``curated``), the
  report, and publishes the report as Prefect artifacts.

``run_score``, ``run_embed`` and ``run_select`` are the plain callables the
curate flow and the CLI use: each sets up the execution environment (one
Prefect API, Ray) and runs its flow.
"""

from __future__ import annotations

import posixpath
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
)
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from gleaner.artifacts import artifact_key as shared_artifact_key
from gleaner.config import GleanerConfig
from gleaner.runs import record_run
from gleaner.runtime import execution_environment, prefect_api, resolve_prefect_api
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.deita import embed as embed_tasks
from gleaner.tasks.deita import score as score_tasks
from gleaner.tasks.select import report as report_tasks
from gleaner.tasks.select import selectors as sel

INGEST_STAGE = "ingest"
RATE_STAGE = "rate"
SELECT_STAGE = "select"
CURATED_STAGE = "curated"


def artifact_key(kind: str, run_id: str) -> str:
    return shared_artifact_key(kind, run_id)


def batch_bounds(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n_rows)) for s in range(0, n_rows, max(1, batch_size))]


def check_plan(store: Store, run_id: str, name: str, stage: str, plan: dict[str, Any]) -> None:
    """A rerun must cut the same batches, or skipping finished parts would skip the wrong rows."""
    path = store.run_path(run_id, f"{name}-plan.json")
    if store.has_stage(run_id, stage) and store.exists(path):
        previous = store.read_json(path)
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise ValueError(
                f"run {run_id!r} already has {stage} output made with different settings "
                f"({', '.join(changed)}); rerun with the same settings to resume, "
                "or clear the stage"
            )
    store.write_json(path, plan)


def read_examples(store: Store, run_id: str, columns: list[str] | None = None) -> pa.Table:
    if not store.has_stage(run_id, INGEST_STAGE):
        raise FileNotFoundError(
            f"run {run_id!r} has no ingested examples in {store.url}; run gleaner ingest first"
        )
    return store.read_stage(run_id, INGEST_STAGE, columns=columns, schema=EXAMPLE_SCHEMA)


# ---- score -----------------------------------------------------------------------------
@flow(name="deita-score", flow_run_name="score-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def score_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Complexity and quality scores (and evol) for every ingested example of the run."""
    logger = get_run_logger()
    started = time.perf_counter()
    settings = config.score
    store = Store(config.store.url, config.store.options)
    rows = read_examples(store, run_id, ["id", "conversation"]).to_pylist()
    bounds = batch_bounds(len(rows), settings.batch_size)
    c_name, q_name = score_tasks.model_names(settings)
    check_plan(store, run_id, "score", score_tasks.STAGE, {
        "batch_size": settings.batch_size, "examples": len(rows), "backend": settings.backend,
        "complexity_model": c_name, "quality_model": q_name,
    })
    finished = store.finished_parts(run_id, score_tasks.STAGE)
    pending = [i for i in range(len(bounds)) if i not in finished]
    logger.info("scoring %d examples in %d batches (%d finished earlier) with %s / %s",
                len(rows), len(bounds), len(finished), c_name, q_name)
    job = score_tasks.ScoreJob(run_id, config.store.url, dict(config.store.options), settings)
    task = score_tasks.score_batch_task.with_options(retries=settings.task_retries)
    futures: dict[Any, int] = {}
    for index in pending:
        batch = rows[bounds[index][0] : bounds[index][1]]
        with remote_options(num_cpus=settings.task_cpus, num_gpus=settings.num_gpus or None):
            futures[task.submit(index=index, job=job, rows=batch)] = index
    for future in as_completed(list(futures)):
        index = futures[future]
        future.wait()
        if future.state.is_completed():
            continue
        error = _state_error(future)
        logger.error("score batch %05d failed after retries: %s", index, error)
        ids = [r["id"] for r in rows[bounds[index][0] : bounds[index][1]]]
        table = score_tasks.failed_score_rows(ids, f"task: {error}", c_name, q_name)
        store.write_part(run_id, score_tasks.STAGE, index, table)
    summary = score_summary(store, run_id)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    store.write_json(store.run_path(run_id, "score-summary.json"), summary)
    create_markdown_artifact(
        key=artifact_key("score", run_id), markdown=score_markdown(summary),
        description=f"DEITA scores of run {run_id}",
    )
    return summary


def _state_error(future: Any) -> str:
    try:
        future.result(raise_on_failure=True)
    except Exception as error:  # the task's own exception, already scrubbed of keys by the client
        return f"{type(error).__name__}: {error}"
    return str(future.state.message or future.state.type)


def score_summary(store: Store, run_id: str) -> dict[str, Any]:
    table = store.read_stage(run_id, score_tasks.STAGE, schema=score_tasks.SCORE_SCHEMA)
    ok = table.filter(pc.equal(table["status"], "ok"))
    summary: dict[str, Any] = {
        "run_id": run_id, "stage": score_tasks.STAGE, "scored": ok.num_rows,
        "failed": table.num_rows - ok.num_rows, "rows": table.num_rows,
        "complexity_model": table["complexity_model"][0].as_py() if table.num_rows else None,
        "quality_model": table["quality_model"][0].as_py() if table.num_rows else None,
    }
    for column in ("complexity", "quality", "evol"):
        mean = pc.mean(ok[column]).as_py() if ok.num_rows else None
        summary[f"mean_{column}"] = None if mean is None else round(mean, 4)
    return summary


def score_markdown(summary: dict[str, Any]) -> str:
    return "\n".join([
        f"# DEITA scores, run {summary['run_id']}", "",
        f"Scored **{summary['scored']:,}**, failed **{summary['failed']:,}** "
        f"(models: {summary['complexity_model']} / {summary['quality_model']})", "",
        "| mean complexity | mean quality | mean evol |", "|---:|---:|---:|",
        f"| {summary['mean_complexity']} | {summary['mean_quality']} | {summary['mean_evol']} |",
    ])


def run_score(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    with execution_environment(config):
        summary = score_flow(run_id=run_id, config=config)
    record_run(store, run_id, config, score=summary)
    return summary


# ---- embed -----------------------------------------------------------------------------
def cache_dir(store: Store, model: str) -> str:
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}@{embed_tasks.TEXT_FORMAT}")[:180]
    return store.path("cache", "embeddings", key)


def load_cached_vectors(store: Store, directory: str, wanted: set[str]) -> dict[str, np.ndarray]:
    """Vectors earlier runs made with the same model and text format (by example id)."""
    try:
        paths = sorted(p for p in store.fs.ls(directory, detail=False, refresh=True)
                       if p.endswith(".parquet"))
    except FileNotFoundError:
        return {}
    if not paths or not wanted:
        return {}
    table = store.dataset(paths).to_table(
        filter=pc.field("id").isin(pa.array(sorted(wanted), pa.string()))
    )
    ids, vectors = embed_tasks.table_vectors(table)
    return dict(zip(ids, vectors, strict=True))


def embed_examples(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Embed every ingested example (Ray must be up): the body of embed_flow, testable alone."""
    started = time.perf_counter()
    settings = config.embed
    model = embed_tasks.model_name(settings.model, settings.pooling)
    rows = read_examples(store, run_id, ["id", "conversation"]).to_pylist()
    ids = [r["id"] for r in rows]
    texts = [embed_tasks.example_text(r) for r in rows]
    batches = embed_tasks.length_batches(ids, texts, settings.batch_size)
    check_plan(store, run_id, "embed", embed_tasks.STAGE, {
        "batch_size": settings.batch_size, "examples": len(rows), "model": model,
        "text_format": embed_tasks.TEXT_FORMAT,
    })
    finished = store.finished_parts(run_id, embed_tasks.STAGE)
    pending = [i for i in range(len(batches)) if i not in finished]
    directory = cache_dir(store, model)
    wanted = {i for b in pending for i in batches[b][0]}
    cache = load_cached_vectors(store, directory, wanted) if settings.cache else {}
    jobs: list[tuple[int, list[str], list[str]]] = []
    from_cache = embedded = 0
    for index in pending:
        batch_ids, batch_texts = batches[index]
        missing = [(i, t) for i, t in zip(batch_ids, batch_texts, strict=True) if i not in cache]
        if not missing:
            _write_embed_part(store, run_id, index, batch_ids, model, cache, {})
            from_cache += len(batch_ids)
            continue
        jobs.append((index, [i for i, _ in missing], [t for _, t in missing]))
    actors = 0
    if jobs:
        import ray

        actors = max(1, min(settings.actors, len(jobs)))
        pool, pool_actors = embed_tasks.actor_pool(
            actors, settings.model, settings.pooling, settings.max_length,
            settings.num_cpus, settings.num_gpus,
        )
        try:
            for index, done_ids, vectors in embed_tasks.embed_on_pool(pool, jobs):
                fresh = dict(zip(done_ids, vectors, strict=True))
                if settings.cache:  # cache first: a crash before the part costs no recompute
                    store.write_table(
                        posixpath.join(directory, f"{run_id}-{index:05d}.parquet"),
                        embed_tasks.vectors_table(done_ids, model, vectors),
                    )
                batch_ids = batches[index][0]
                _write_embed_part(store, run_id, index, batch_ids, model, cache, fresh)
                embedded += len(done_ids)
                from_cache += len(batch_ids) - len(done_ids)
        finally:
            for actor in pool_actors:
                ray.kill(actor)
    seconds = time.perf_counter() - started
    return {
        "run_id": run_id, "stage": embed_tasks.STAGE, "model": model, "examples": len(rows),
        "batches": len(batches), "skipped_batches": len(finished), "embedded": embedded,
        "from_cache": from_cache, "actors": actors, "seconds": round(seconds, 2),
        "per_second": round(embedded / seconds, 1) if embedded else None,
    }


def _write_embed_part(store: Store, run_id: str, index: int, batch_ids: list[str], model: str,
                      cache: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> None:
    vectors = np.stack([fresh[i] if i in fresh else cache[i] for i in batch_ids])
    store.write_part(run_id, embed_tasks.STAGE, index,
                     embed_tasks.vectors_table(batch_ids, model, vectors))


@flow(name="deita-embed", flow_run_name="embed-{run_id}", validate_parameters=False)
def embed_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Embeddings of every ingested example on a Ray actor pool (Ray initialised by the caller)."""
    store = Store(config.store.url, config.store.options)
    summary = embed_examples(store, run_id, config)
    get_run_logger().info(
        "embedded %d examples (%d from the cache, %d batches skipped) with %s",
        summary["embedded"], summary["from_cache"], summary["skipped_batches"], summary["model"],
    )
    create_markdown_artifact(
        key=artifact_key("embed", run_id),
        markdown=(f"# Embeddings, run {run_id}\n\n{summary['examples']:,} examples, model "
                  f"{summary['model']}: {summary['embedded']:,} embedded, "
                  f"{summary['from_cache']:,} from the cache, {summary['skipped_batches']} "
                  f"batches already done ({summary['per_second']} per second)"),
        description=f"embeddings of run {run_id}",
    )
    return summary


def run_embed(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    with execution_environment(config):
        summary = embed_flow(run_id=run_id, config=config)
    record_run(store, run_id, config, embed=summary)
    return summary


# ---- select ----------------------------------------------------------------------------
def candidates(store: Store, run_id: str, need_vectors: bool) -> dict[str, Any]:
    """Every ingested example's id with what the upstream stages said about it (by id).

    Columns: ``rating`` (AlpaGasus, rate stage, null unless ok), ``complexity``,
    ``quality``, ``evol`` (score stage, null unless ok) and the vectors.
    """
    ids = read_examples(store, run_id, ["id"]).column("id").to_pylist()
    where = {example_id: row for row, example_id in enumerate(ids)}
    columns: dict[str, np.ndarray] = {}

    def put(table: pa.Table, source: str, target: str) -> None:
        values = np.full(len(ids), np.nan)
        ok = table.column("status").to_pylist()
        for example_id, value, status in zip(table.column("id").to_pylist(),
                                             table.column(source).to_pylist(), ok, strict=True):
            row = where.get(example_id)
            if row is not None and status == "ok" and value is not None:
                values[row] = value
        columns[target] = values

    if store.has_stage(run_id, RATE_STAGE):
        put(store.read_stage(run_id, RATE_STAGE, columns=["id", "score", "status"]),
            "score", "rating")
    if store.has_stage(run_id, score_tasks.STAGE):
        scores = store.read_stage(run_id, score_tasks.STAGE)
        for name in scores.column_names:
            floating = pa.types.is_floating(scores.schema.field(name).type)
            if name not in ("id", "status") and floating:
                put(scores.select(["id", name, "status"]), name, name)
    vectors = vector_ok = None
    if need_vectors:
        if not store.has_stage(run_id, embed_tasks.STAGE):
            raise FileNotFoundError(f"run {run_id!r} has no embeddings; run gleaner embed first")
        vec_ids, matrix = embed_tasks.table_vectors(store.read_stage(run_id, embed_tasks.STAGE))
        vectors = np.zeros((len(ids), matrix.shape[1]), dtype=np.float32)
        vector_ok = np.zeros(len(ids), dtype=bool)
        for example_id, vector in zip(vec_ids, matrix, strict=True):
            row = where.get(example_id)
            if row is not None:
                vectors[row] = vector
                vector_ok[row] = True
    return {"ids": ids, "columns": columns, "vectors": vectors, "vector_ok": vector_ok}


def run_selector(data: dict[str, Any], config: GleanerConfig, size: int | None = None
                 ) -> sel.Manifest:
    """The configured selector on the candidates; after AlpaGasus' threshold when one is set."""
    s = config.select
    ids, columns = data["ids"], data["columns"]
    sort_by = s.sort_by or ("rating" if s.selector == "threshold" else "evol")
    if s.selector != "random" and sort_by not in columns:
        known = ", ".join(sorted(columns)) or "none (run rate or score first)"
        raise ValueError(f"no score column {sort_by!r} in run; available: {known}")
    if s.selector == "threshold":
        threshold = s.threshold if s.threshold is not None else config.rate.threshold
        return sel.select_threshold(ids, columns[sort_by], threshold)
    first = None
    rows = np.arange(len(ids))
    if s.threshold is not None:  # AlpaGasus first, then the selector on what passed
        if "rating" not in columns:
            raise ValueError("--threshold filters on the AlpaGasus rating; run gleaner rate first")
        first = sel.select_threshold(ids, columns["rating"], s.threshold)
        rows = np.flatnonzero(first.selected)
    sub_ids = [ids[i] for i in rows]
    if s.selector == "topk":
        second = sel.select_topk(sub_ids, columns[sort_by][rows], s.budget)
    elif s.selector == "random":
        score = columns.get(sort_by)
        second = sel.select_random(
            sub_ids, size if size is not None else s.budget, s.seed,
            scores=None if score is None else score[rows],
        )
    else:
        second = sel.select_deita(
            sub_ids, columns[sort_by][rows], data["vectors"][rows], budget=s.budget, tau=s.tau,
            vector_ok=data["vector_ok"][rows],
        )
    return second if first is None else sel.chain(first, second)


def selected_count(store: Store, run_id: str) -> int:
    manifest = store.read_stage(run_id, SELECT_STAGE, columns=["selected"])
    return int(pc.sum(manifest["selected"]).as_py() or 0)


@flow(name="deita-select", flow_run_name="select-{run_id}", validate_parameters=False)
def select_flow(run_id: str, config: GleanerConfig, out: str | None = None,
                fmt: str | None = None, size_of: str | None = None) -> dict[str, Any]:
    """Select, write manifest + curated examples + report, publish the report as artifacts."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = Store(config.store.url, config.store.options)
    size = selected_count(store, size_of) if size_of else None
    data = candidates(store, run_id, need_vectors=config.select.selector == "deita")
    manifest = run_selector(data, config, size)
    seconds = time.perf_counter() - started
    store.clear_stage(run_id, SELECT_STAGE)
    store.write_part(run_id, SELECT_STAGE, 0, manifest.to_table())
    curated = write_curated(store, run_id, manifest)
    report = report_tasks.build_report(manifest, data["columns"], config.select,
                                       tau=config.select.tau)
    paths = report_tasks.write_report(store, run_id, report)
    summary: dict[str, Any] = {
        "run_id": run_id, "selector": config.select.selector,
        "sort_by": report.settings.get("sort_by"), "selected": report.counts["kept"],
        "examples": len(manifest), "reasons": report.counts,
        "too_similar": report.counts["too_similar"], "seconds": round(seconds, 2),
        "report": paths, "curated_rows": curated,
    }
    if out:
        from gleaner.tasks.publish.export import write_dataset

        summary["export"] = write_dataset(
            store.read_stage(run_id, CURATED_STAGE, schema=EXAMPLE_SCHEMA), out, fmt
        )
    store.write_json(store.run_path(run_id, "select-summary.json"), summary)
    publish_report(run_id, store, report, paths)
    logger.info("selected %d of %d examples (%s)", summary["selected"], len(manifest),
                ", ".join(f"{k} {v}" for k, v in report.counts.items()))
    return summary


def write_curated(store: Store, run_id: str, manifest: sel.Manifest) -> int:
    """The selected examples, in selection order, as stage ``curated`` (EXAMPLE_SCHEMA)."""
    chosen = manifest.selected_ids
    pool = read_examples(store, run_id)
    picked = pool.filter(pc.is_in(pool["id"], value_set=pa.array(chosen, pa.string())))
    position = {example_id: i for i, example_id in enumerate(chosen)}
    order = np.argsort([position[i] for i in picked.column("id").to_pylist()], kind="stable")
    picked = picked.take(pa.array(order, pa.int64())) if picked.num_rows else picked
    store.clear_stage(run_id, CURATED_STAGE)
    store.write_part(run_id, CURATED_STAGE, 0, picked)
    return picked.num_rows


def publish_report(run_id: str, store: Store, report: Any, paths: dict[str, str]) -> None:
    create_markdown_artifact(
        key=artifact_key("select", run_id), markdown=report.markdown,
        description=f"selection report of run {run_id}",
    )
    figure = paths.get("figure")
    if figure:
        url = store.uri(figure)
        if url.startswith(("http://", "https://")):
            create_image_artifact(image_url=url, key=artifact_key("select-figure", run_id))
        else:
            create_link_artifact(link=url, link_text="score histograms (PNG)",
                                 key=artifact_key("select-figure", run_id))


def run_select(store: Store, run_id: str, config: GleanerConfig, out: str | None = None,
               fmt: str | None = None, size_of: str | None = None) -> dict[str, Any]:
    # Selection runs in this process (numpy); it needs the Prefect API, not Ray.
    with prefect_api(resolve_prefect_api(config)):
        summary = select_flow(run_id=run_id, config=config, out=out, fmt=fmt, size_of=size_of)
    record_run(store, run_id, config, select=summary)
    return summary
