"""The rating stage as a Prefect flow: batches fanned out on Ray, checkpointed, cached, counted.

``rate_flow`` reads the ``ingest`` stage, cuts it into batches in a fixed
order, skips the batches this run already finished (resume after a crash),
takes what the rating cache already knows (other runs, same example id,
model, prompt version, dimension and mode), and submits one Prefect task per
remaining batch through prefect-ray's ``RayTaskRunner``. A batch whose task
fails after its last retry is written as ``failed`` rows with the error, so
every example ends ``ok`` or ``failed``. The summary (counts, histogram,
tokens, estimated cost) goes to the store, to ``run.json`` and to a Prefect
markdown artifact.

``run_rate`` is what the CLI calls: it starts the offline llama.cpp server
when no endpoint is configured and sets up the execution environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from gleaner.artifacts import artifact_key as shared_artifact_key
from gleaner.config import GleanerConfig
from gleaner.llm.client import LLMClient, LLMError
from gleaner.llm.ratelimit import ensure_rate_limiter, limiter_name
from gleaner.progress import progress
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.rate.rating import (
    RATING_SCHEMA,
    STAGE,
    RateJob,
    RateOptions,
    RatingPrompt,
    batch_summary,
    build_prompt,
    failed_rows,
    rate_batch_task,
    write_batch,
)

INGEST_STAGE = "ingest"
EXAMPLE_COLUMNS = ["id", "instruction", "input", "output"]
SUMMARY_FILE = "rate-summary.json"
PLAN_FILE = "rate-plan.json"
BUCKETS = [i / 2 for i in range(11)]  # 0.0, 0.5, ..., 5.0


# ---- small pure helpers ---------------------------------------------------------------
def batch_bounds(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size)]


def cache_key(model: str, prompt_version: str, dimension: str, mode: str) -> str:
    """Ratings are interchangeable only when all four match (the example id is the row key)."""
    blob = "\x00".join([model, prompt_version, dimension, mode])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def histogram(scores: list[float]) -> dict[str, int]:
    """Counts per 0.5 bucket (a score s counts in bucket floor(2s)/2), like the paper's Fig. 4."""
    counts = {f"{b:.1f}": 0 for b in BUCKETS}
    for score in scores:
        bucket = min(5.0, max(0.0, math.floor(score * 2) / 2))
        counts[f"{bucket:.1f}"] += 1
    return counts


def estimate_cost(config: GleanerConfig, model: str, prompt: int, completion: int) -> float | None:
    price = config.prices.get(model)
    if price is None:
        return None
    return round(prompt / 1e6 * price.prompt + completion / 1e6 * price.completion, 6)


def artifact_key(run_id: str, suffix: str) -> str:
    return shared_artifact_key("rate", suffix, run_id)


# ---- the cache ------------------------------------------------------------------------
def load_cache(store: Store, cache_dir: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Earlier ok ratings of the wanted ids (the newest file wins when an id repeats)."""
    try:
        paths = sorted(p for p in store.fs.ls(cache_dir, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return {}
    if not paths:
        return {}
    table = store.dataset(paths, schema=RATING_SCHEMA).to_table(
        filter=pc.field("id").isin(pa.array(sorted(wanted), pa.string()))
    )
    return {row["id"]: row for row in table.to_pylist()}


def cached_table(rows: list[dict[str, Any]]) -> pa.Table:
    reused = [
        {**row, "cached": True, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0,
         "latency_ms": 0.0}
        for row in rows
    ]
    return pa.Table.from_pylist(reused, schema=RATING_SCHEMA)


# ---- score-only needs logprobs: ask once ------------------------------------------------
async def _probe_logprobs(config: GleanerConfig, prompt: RatingPrompt) -> tuple[bool, dict]:
    example = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    async with LLMClient(config.rate.endpoint, concurrency=1) as client:
        completion = await client.chat(
            prompt.messages(example), max_tokens=1, logprobs=True,
            top_logprobs=config.rate.top_logprobs,
        )
        return completion.top_logprobs is not None, client.usage.as_dict()


def resolve_mode(config: GleanerConfig, prompt: RatingPrompt) -> tuple[str, dict, str | None]:
    """The mode actually used, the probe's usage, and a note when score-only fell back."""
    mode = config.rate.mode or "explain"
    if mode != "score-only":
        return mode, {}, None
    try:
        has_logprobs, usage = asyncio.run(_probe_logprobs(config, prompt))
    except LLMError as error:
        raise RuntimeError(f"the rating endpoint does not answer: {error}") from None
    if has_logprobs:
        return mode, usage, None
    note = (
        f"endpoint model {config.rate.endpoint.model!r} returns no logprobs: "
        "score-only mode falls back to explain for this run"
    )
    return "explain", usage, note


# ---- the flow -------------------------------------------------------------------------
def failed_batches_to_retry(store: Store, run_id: str) -> dict[int, pa.Table]:
    """Finished batches holding failed rows, each with the ok rows to keep."""
    retry: dict[int, pa.Table] = {}
    for index, path in store.part_paths(store.stage_path(run_id, STAGE)).items():
        part = store.dataset([path], schema=RATING_SCHEMA).to_table()
        if pc.any(pc.equal(part["status"], "failed")).as_py():
            retry[index] = part.filter(pc.equal(part["status"], "ok"))
    return retry


def _check_plan(store: Store, run_id: str, plan: dict[str, Any]) -> None:
    """A rerun must cut the same batches, or 'skip finished batches' would skip the wrong rows."""
    path = store.run_path(run_id, PLAN_FILE)
    if store.has_stage(run_id, STAGE) and store.exists(path):
        previous = store.read_json(path)
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise ValueError(
                f"run {run_id!r} already has ratings made with different settings "
                f"({', '.join(changed)}); rerun with the same settings to resume, or --force"
            )
    store.write_json(path, plan)


@flow(
    name="rate",
    flow_run_name="rate-{run_id}",
    task_runner=RayTaskRunner(),
    validate_parameters=False,
)
def rate_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Rate every ingested example of ``run_id``; returns (and stores) the summary."""
    logger = get_run_logger()
    started = time.perf_counter()
    rate = config.rate
    if not rate.endpoint.base_url:
        raise ValueError(
            "rate.endpoint.base_url is not set: call run_rate (it starts the offline llama.cpp "
            "server) or configure an OpenAI-compatible endpoint"
        )
    store = Store(config.store.url, config.store.options)
    examples = store.read_stage(run_id, INGEST_STAGE, columns=EXAMPLE_COLUMNS)
    prompt = build_prompt(rate.dimension, rate.template_file)
    model = rate.endpoint.model
    rows = examples.to_pylist()
    bounds = batch_bounds(len(rows), rate.batch_size)

    if rate.force:
        store.clear_stage(run_id, STAGE)
    finished = store.finished_parts(run_id, STAGE)
    kept_rows = failed_batches_to_retry(store, run_id) if rate.retry_failed else {}
    finished -= set(kept_rows)
    pending = [i for i in range(len(bounds)) if i not in finished]
    mode, probe_usage, fallback_note = (
        resolve_mode(config, prompt) if pending else (rate.mode or "explain", {}, None)
    )
    if fallback_note:
        logger.warning(fallback_note)
    key = cache_key(model, prompt.version, prompt.dimension, mode)
    _check_plan(store, run_id, {
        "batch_size": rate.batch_size, "examples": len(rows), "model": model,
        "prompt_version": prompt.version, "dimension": prompt.dimension, "mode": mode,
    })

    wanted = {r["id"] for i in pending for r in rows[bounds[i][0]:bounds[i][1]]}
    cache = {} if (rate.force or not rate.cache) else load_cache(
        store, store.path("cache", "ratings", key), wanted
    )
    limiter, limiter_handle = None, None
    if rate.endpoint.rpm or rate.endpoint.tpm:
        limiter = limiter_name(rate.endpoint.base_url or "", model)
        # the flow holds the handle: a non-detached actor lives as long as its owner's handles
        limiter_handle = ensure_rate_limiter(limiter, rate.endpoint.rpm, rate.endpoint.tpm)
    job = RateJob(
        run_id=run_id, store_url=config.store.url, store_options=dict(config.store.options),
        endpoint=rate.endpoint, prompt=prompt, mode=mode,  # type: ignore[arg-type]
        options=RateOptions(rate.parse_retries, rate.explain_max_tokens, rate.top_logprobs),
        limiter=limiter,
        cache_dir=store.path("cache", "ratings", key) if rate.cache else None,
    )
    logger.info(
        "rating %d examples in %d batches (%d finished earlier, %d ratings from the cache), "
        "model %s, mode %s, dimension %s",
        len(rows), len(bounds), len(finished), len(cache), model, mode, prompt.dimension,
    )

    progress_id = create_progress_artifact(
        progress=100.0 * len(finished) / max(1, len(bounds)),
        key=artifact_key(run_id, "progress"),
        description=f"rating batches of run {run_id}",
    )
    done = len(finished)
    # the same progress for a person at the terminal: a bar in a TTY, plain lines in logs
    bar = progress(len(bounds), f"rate {run_id}", unit="batch", initial=len(finished))

    def advance() -> None:
        nonlocal done
        done += 1
        update_progress_artifact(artifact_id=progress_id, progress=100.0 * done / len(bounds))
        bar.update(1)

    batch_task = rate_batch_task.with_options(
        retries=rate.task_retries, retry_delay_seconds=rate.task_retry_delay_s
    )
    futures: dict[Any, tuple[int, list[str], pa.Table]] = {}
    for index in pending:
        batch = rows[bounds[index][0]:bounds[index][1]]
        reused = cached_table([cache[r["id"]] for r in batch if r["id"] in cache])
        if index in kept_rows:  # a retry of failed examples keeps the batch's ok ratings
            keep = kept_rows[index]
            kept_ids = set(keep["id"].to_pylist())
            batch = [r for r in batch if r["id"] not in kept_ids]
            not_kept = ~pc.field("id").isin(pa.array(sorted(kept_ids), pa.string()))
            reused = pa.concat_tables([keep, reused.filter(not_kept)])
        todo = [r for r in batch if r["id"] not in cache]
        if not todo:
            write_batch(job, index, reused.slice(0, 0), reused)
            advance()
            continue
        with remote_options(num_cpus=rate.task_cpus):
            future = batch_task.submit(index=index, job=job, rows=todo, cached=reused)
        futures[future] = (index, [r["id"] for r in todo], reused)

    rating_s = 0.0
    for future in as_completed(list(futures)):
        index, todo_ids, reused = futures[future]
        future.wait()
        state = future.state
        if state.is_completed():
            rating_s += float(future.result().get("rating_s", 0.0))
        else:
            error = future.result(raise_on_failure=False)
            message = f"batch failed after {rate.task_retries} retries: {error}"[:500]
            logger.error("batch %05d: %s", index, message)
            failed = failed_rows(todo_ids, prompt, model, mode, message)
            write_batch(job, index, failed, reused)
        advance()
    bar.close()

    del limiter_handle  # every batch is done: the bucket may go
    summary = summarize(store, run_id, config, prompt, mode, len(rows), probe_usage)
    summary.update(
        batches=len(bounds), batches_resumed=len(finished), cache_key=key,
        elapsed_s=round(time.perf_counter() - started, 3), mode_note=fallback_note,
        # seconds spent inside rate_batch over all submitted batches (the rest is orchestration)
        batch_rating_s=round(rating_s, 3), batches_submitted=len(futures),
    )
    store.write_json(store.run_path(run_id, SUMMARY_FILE), summary)
    record_run(store, run_id, config, rate=summary)
    create_markdown_artifact(
        markdown=summary_markdown(summary),
        key=artifact_key(run_id, "summary"),
        description=f"AlpaGasus rating of run {run_id}",
    )
    return summary


def summarize(
    store: Store,
    run_id: str,
    config: GleanerConfig,
    prompt: RatingPrompt,
    mode: str,
    n_examples: int,
    probe_usage: dict[str, int],
) -> dict[str, Any]:
    """Counts from the checkpoints themselves: read = kept + below + failed, or an error."""
    table = store.read_stage(run_id, STAGE, schema=RATING_SCHEMA)
    tau = config.rate.threshold
    ok = table.filter(pc.equal(table["status"], "ok"))
    failed = table.filter(pc.equal(table["status"], "failed"))
    scores = [s for s in ok["score"].to_pylist() if s is not None]
    kept = sum(1 for s in scores if s >= tau)
    totals = batch_summary(-1, table)
    requests = totals["requests"] + probe_usage.get("requests", 0)
    prompt_tokens = totals["prompt_tokens"] + probe_usage.get("prompt_tokens", 0)
    completion_tokens = totals["completion_tokens"] + probe_usage.get("completion_tokens", 0)
    model = config.rate.endpoint.model
    cost = estimate_cost(config, model, prompt_tokens, completion_tokens)
    failures: dict[str, int] = {}
    for kind in failed["error_kind"].to_pylist():
        failures[kind or "unknown"] = failures.get(kind or "unknown", 0) + 1
    summary = {
        "run_id": run_id,
        "model": model,
        "dimension": prompt.dimension,
        "mode": mode,
        "prompt_version": prompt.version,
        "threshold": tau,
        "read": n_examples,
        "rated": ok.num_rows,
        "failed": failed.num_rows,
        "kept": kept,
        "below": ok.num_rows - kept,
        "cached": totals["cached"],
        "failures": failures,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "est_cost_usd": cost if cost is not None else 0.0,
        "price_known": cost is not None,
        "histogram": histogram(scores),
    }
    if summary["kept"] + summary["below"] + summary["failed"] != n_examples:
        raise RuntimeError(
            f"rating of run {run_id} does not add up: read {n_examples} != kept {kept} + "
            f"below {summary['below']} + failed {summary['failed']}"
        )
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Rating of run `{summary['run_id']}`",
        "",
        f"model `{summary['model']}`, dimension **{summary['dimension']}**, "
        f"mode {summary['mode']}, threshold {summary['threshold']}",
        "",
        "| read | kept | below | failed | from cache |",
        "|---:|---:|---:|---:|---:|",
        f"| {summary['read']} | {summary['kept']} | {summary['below']} | {summary['failed']} "
        f"| {summary['cached']} |",
        "",
        f"{summary['requests']} requests, {summary['prompt_tokens']} prompt + "
        f"{summary['completion_tokens']} completion tokens, est. ${summary['est_cost_usd']:.4f}",
        "",
        "| score | examples |",
        "|---:|---:|",
        *(f"| {bucket} | {count} |" for bucket, count in summary["histogram"].items()),
    ]
    if summary.get("failures"):
        lines += ["", "Failures: " + ", ".join(f"{k} {v}" for k, v in summary["failures"].items())]
    if summary.get("mode_note"):
        lines += ["", f"Note: {summary['mode_note']}"]
    return "\n".join(lines)


def run_rate(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """Run the flow (offline llama.cpp server if no endpoint is set) in one Prefect API + Ray."""
    with contextlib.ExitStack() as stack:
        if config.rate.endpoint.base_url is None:
            from gleaner.llm.local_server import local_llm_server

            server = stack.enter_context(local_llm_server(q4_0=config.rate.offline_q4_0))
            config = config.with_overrides({
                "rate.endpoint.base_url": server.base_url,
                "rate.endpoint.model": server.model,
                "rate.mode": config.rate.mode or "score-only",
                # one llama.cpp server on this machine: more parallel requests only queue
                "rate.endpoint.concurrency": min(config.rate.endpoint.concurrency, 2),
            })
        stack.enter_context(execution_environment(config))
        return rate_flow(run_id=run_id, config=config)

