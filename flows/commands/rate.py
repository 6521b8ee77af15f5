"""``gleaner rate --run-id ID``: rate a run's ingested examples (AlpaGasus) and filter by score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    BatchAPIOption,
    ConfigOption,
    ForceOption,
    JsonOption,
    NoCacheOption,
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


def format_summary(summary: dict[str, Any]) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in summary.get("failures", {}).items())
    cost = f"${summary['est_cost_usd']:.4f}" if summary.get("price_known") else "price unknown"
    bars = "\n".join(
        f"  {bucket:>4}  {count:>7}" for bucket, count in summary["histogram"].items()
    )
    text = (
        f"run {summary['run_id']}: rated {summary['rated']} of {summary['read']} with "
        f"{summary['model']} ({summary['dimension']}, {summary['mode']})\n"
        f"kept {summary['kept']} (score >= {summary['threshold']}), below {summary['below']}, "
        f"failed {summary['failed']}" + (f" ({failures})" if failures else "") + "\n"
        f"{summary['cached']} from the cache; {summary['requests']} requests, "
        f"{summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion tokens, "
        f"est. cost {cost}\nscore histogram:\n{bars}"
    )
    batch = summary.get("batch_api")
    if batch:
        text += (f"\nBatch API: {batch['examples']} examples in {batch['batches']} batches "
                 f"({batch['rounds']} rounds), billed at the batch price")
    if summary.get("mode_note"):
        text += f"\nnote: {summary['mode_note']}"
    return text


@app.command("rate")
def rate(
    run_id: str = typer.Option(..., "--run-id", help="The run whose ingested examples to rate."),
    store: str | None = StoreOption,
    base_url: str | None = typer.Option(
        None, "--base-url", help="OpenAI-compatible endpoint (default: offline llama.cpp)."
    ),
    model: str | None = typer.Option(None, "--model", help="Model name at the endpoint."),
    dimension: str | None = typer.Option(
        None, "--dimension", help="accuracy (default), helpfulness, relevance, or your own."
    ),
    mode: str | None = typer.Option(
        None, "--mode", help="explain (the paper's), score-only (logprobs, 1 token), or any "
        "registered rater."
    ),
    template: Path | None = typer.Option(
        None, "--template", exists=True, dir_okay=False, help="User prompt template file."
    ),
    batch_size: int | None = RowsPerBatchOption,
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Requests in flight per batch."
    ),
    rpm: int | None = typer.Option(None, "--rpm", min=1, help="Cluster-wide requests/min."),
    tpm: int | None = typer.Option(None, "--tpm", min=1, help="Cluster-wide tokens/min."),
    threshold: float | None = typer.Option(None, "--threshold", help="Keep score >= this."),
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    batch_api: bool = BatchAPIOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Rate every example of a run with an LLM (AlpaGasus) and count what passes the threshold."""
    config = build_config(
        config_file,
        **{
            "store.url": store,
            "rate.endpoint.base_url": base_url,
            "rate.endpoint.model": model,
            "rate.resources.concurrency": concurrency,
            "rate.endpoint.rpm": rpm,
            "rate.endpoint.tpm": tpm,
            "rate.dimension": dimension,
            "rate.mode": choice("rater", mode, "--mode"),
            "rate.template_file": str(template) if template else None,
            "rate.resources.batch_size": batch_size,
            "rate.threshold": threshold,
            "rate.endpoint.api": "batch" if batch_api else None,
            **stage_flags("rate", force, no_cache, retry_failed),
        },
    )
    from gleaner.flows.rate_flow import run_rate
    from gleaner.store import Store

    if not Store(config.store.url, config.store.options).has_stage(run_id, "ingest"):
        fail(f"run {run_id!r} has no ingested examples in {config.store.url}; run gleaner ingest")
    summary = run_or_fail(run_rate, config, run_id)
    emit(summary, as_json, format_summary(summary))
