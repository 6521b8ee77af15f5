"""``gleaner compare``: comparison data (GPT-4-LLM): K responses per prompt, graded, paired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    ForceOption,
    JsonOption,
    NoCacheOption,
    RetryFailedOption,
    RowsPerBatchOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
    run_or_fail,
    stage_flags,
)


def compare_text(s: dict[str, Any]) -> str:
    sources = ", ".join(f"{k} {v:,}" for k, v in s["responses_from"].items())
    unavailable = ", ".join(f"{k} {v:,}" for k, v in s["unavailable"].items())
    failures = ", ".join(f"{k} {v}" for k, v in s.get("failures", {}).items())
    return (
        f"run {s['run_id']}: {s['prompts']:,} prompts, {s['prompts_judged']:,} with two or more "
        f"responses ({s['prompts_single_response']:,} with one: no pair"
        + (f", {s['prompts_beyond_limit']:,} beyond --limit" if s["prompts_beyond_limit"] else "")
        + f")\nresponses read: {sources}"
        + (f" (unavailable: {unavailable})" if unavailable else "")
        + f"; {s['duplicates_merged']:,} identical merged, {s['empty_skipped']:,} empty skipped\n"
        f"graded {s['responses']:,} with {s['judge_model']}: {s['scored']:,} scored, "
        f"{s['failed']:,} failed" + (f" ({failures})" if failures else "")
        + f", {s['cached']:,} from the cache\n"
        f"pairs: {s['pairs']:,} (s_l < s_h), ties skipped: {s['ties_skipped']:,}\n"
        f"{s['requests']:,} requests, est. ${s['est_cost_usd']:.4f}; pairs in {s['pairs_path']}")


@app.command("compare")
def compare(
    run_id: str = typer.Option(..., "--run-id", help="The run whose prompts to compare."),
    responses: list[str] | None = typer.Option(
        None, "--responses", help="Response sources: original, teacher, evaluate:<model>, or an "
        "answer file (JSONL with prompt, answer and optional id); repeatable. Default: "
        "original teacher."),
    store: str | None = StoreOption,
    judge_base_url: str | None = typer.Option(
        None, "--judge-base-url", help="OpenAI-compatible judge (default: offline llama.cpp)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Default gpt-4."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="The first N prompts."),
    batch_size: int | None = RowsPerBatchOption,
    concurrency: int | None = typer.Option(None, "--concurrency", min=1),
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Grade K responses per prompt 1-10 and write every pair with s_l < s_h (GPT-4-LLM)."""
    config = build_config(config_file, **{
        "store.url": store, "compare.endpoint.base_url": judge_base_url,
        "compare.endpoint.model": judge_model, "compare.limit": limit,
        "compare.resources.batch_size": batch_size,
        "compare.resources.concurrency": concurrency,
        **stage_flags("compare", force, no_cache, retry_failed)})
    from gleaner.flows.compare_flow import run_compare
    from gleaner.store import Store

    if not Store(config.store.url, config.store.options).has_stage(run_id, "ingest") and not (
            responses and all(r.partition(":")[0] not in ("original", "teacher")
                              for r in responses)):
        fail(f"run {run_id!r} has no ingested examples in {config.store.url}; run gleaner "
             "ingest, or give only answer files / evaluate:<model> as --responses")
    summary = run_or_fail(run_compare, config, run_id, responses or None)
    emit(summary, as_json, compare_text(summary))
