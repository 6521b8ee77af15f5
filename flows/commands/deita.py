"""``gleaner score``, ``gleaner embed``, ``gleaner select``: DEITA's stages, AlpaGasus' filter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ActorsOption,
    BatchAPIOption,
    ConfigOption,
    ForceOption,
    InputRunOption,
    JsonOption,
    NoCacheOption,
    NumGpusOption,
    RetryFailedOption,
    RowsPerBatchOption,
    StoreOption,
    app,
    build_config,
    choice,
    emit,
    fail,
    run_or_fail,
    stage_flags,
)


def _store(config: Any) -> Any:
    from gleaner.store import Store

    return Store(config.store.url, config.store.options)


@app.command("score")
def score(
    run_id: str = InputRunOption,
    store: str | None = StoreOption,
    backend: str | None = typer.Option(None, "--backend", help="hf (default) or endpoint."),
    complexity_model: str | None = typer.Option(
        None, "--complexity-model",
        help="HF id/path/.gguf (hf) or model name (endpoint); default: offline SmolLM2.",
    ),
    quality_model: str | None = typer.Option(None, "--quality-model"),
    base_url: str | None = typer.Option(
        None, "--base-url", help="OpenAI-compatible endpoint returning top_logprobs."
    ),
    batch_size: int | None = RowsPerBatchOption,
    num_gpus: float | None = NumGpusOption,
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    batch_api: bool = BatchAPIOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Score complexity c, quality q and evol s = sum c*q of every example (DEITA)."""
    overrides: dict[str, Any] = {
        "store.url": store, "score.backend": choice("scorer", backend, "--backend"),
        "score.complexity_model": complexity_model, "score.quality_model": quality_model,
        "score.resources.batch_size": batch_size, "score.resources.gpus": num_gpus,
        **stage_flags("score", force, no_cache, retry_failed),
    }
    if base_url:
        overrides["score.endpoint.base_url"] = base_url
        overrides["score.backend"] = backend or "endpoint"
    if batch_api:
        overrides["score.endpoint.api"] = "batch"
    config = build_config(config_file, **overrides)
    from gleaner.flows.deita_flow import run_score

    summary = run_or_fail(run_score, _store(config), run_id, config)
    emit(summary, as_json,
         f"run {run_id}: scored {summary['scored']:,}, failed {summary['failed']:,}; mean c "
         f"{summary['mean_complexity']}, q {summary['mean_quality']}, s {summary['mean_evol']}")


@app.command("embed")
def embed(
    run_id: str = InputRunOption,
    store: str | None = StoreOption,
    model: str | None = typer.Option(
        None, "--model", help="HF encoder id/path (default: all-MiniLM-L6-v2, offline)."
    ),
    pooling: str | None = typer.Option(
        None, "--pooling", help="mean (sentence encoders) or last (causal LM, DEITA's)."
    ),
    batch_size: int | None = RowsPerBatchOption,
    actors: int | None = ActorsOption,
    num_gpus: float | None = NumGpusOption,
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Embed every example's conversation on a Ray actor pool (cached by id and model)."""
    if pooling is not None and pooling not in ("mean", "last"):
        fail(f"--pooling must be mean or last, not {pooling!r}")
    config = build_config(config_file, **{
        "store.url": store, "embed.model": model, "embed.pooling": pooling,
        "embed.resources.batch_size": batch_size, "embed.resources.actors": actors,
        "embed.resources.gpus": num_gpus, **stage_flags("embed", force, no_cache, retry_failed),
    })
    from gleaner.flows.deita_flow import run_embed

    summary = run_or_fail(run_embed, _store(config), run_id, config)
    emit(summary, as_json,
         f"run {run_id}: {summary['examples']:,} examples, {summary['made']:,} embedded, "
         f"{summary['cached']:,} from the cache, {summary['batches_resumed']} batches done "
         f"earlier ({summary['model']})")


@app.command("select")
def select(
    run_id: str = InputRunOption,
    store: str | None = StoreOption,
    selector: str | None = typer.Option(
        None, "--selector", help="deita (default), threshold, topk, random, or any registered."
    ),
    sort_by: str | None = typer.Option(
        None, "--sort-by", help="evol | rating | complexity | quality | any score column."
    ),
    size: int | None = typer.Option(None, "--size", "--budget", min=0,
                                    help="How many to select (select.size)."),
    fraction: float | None = typer.Option(
        None, "--fraction", min=0.0, max=1.0,
        help="A share of the pool instead of --size (IFD keeps the top 0.05)."),
    tau: float | None = typer.Option(None, "--tau", help="deita: max cosine similarity."),
    threshold: float | None = typer.Option(
        None, "--threshold",
        help="threshold selector: keep score >= this; others: AlpaGasus rating filter first.",
    ),
    seed: int | None = typer.Option(None, "--seed", help="random selector's seed."),
    size_of: str | None = typer.Option(
        None, "--size-of", help="random: as many as this run's selection kept."
    ),
    out: str | None = typer.Option(None, "--out", help="Write the selected examples here."),
    fmt: str | None = typer.Option(
        None, "--format", help="alpaca | jsonl | parquet | sharegpt (default: from --out)."
    ),
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
    force: bool = ForceOption,
) -> None:
    """Select the curated set; every example gets `selected` and a reason in the manifest."""
    choice("export_format", fmt, "--format")
    config = build_config(config_file, **{
        "store.url": store, "select.selector": choice("selector", selector, "--selector"),
        "select.sort_by": sort_by,
        "select.size": size, "select.fraction": fraction, "select.tau": tau,
        "select.threshold": threshold,
        "select.seed": seed,
    })
    from gleaner.flows.select_flow import run_select

    summary = run_or_fail(run_select, _store(config), run_id, config, out=out, fmt=fmt,
                          size_of=size_of, force=force)
    reasons = ", ".join(f"{k} {v:,}" for k, v in summary["reasons"].items())
    text = (f"run {run_id}: selected {summary['selected']:,} of {summary['examples']:,} "
            f"({summary['selector']} by {summary['sort_by']}); {reasons}")
    if summary.get("export"):
        text += f"\nwrote {summary['export']['rows']:,} examples to {summary['export']['path']}"
    emit(summary, as_json, text)
