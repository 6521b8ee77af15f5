"""``gleaner generate self-instruct`` and ``gleaner regenerate``: making data (SPEC §8)."""

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
    RunIdOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
    run_or_fail,
    stage_flags,
)

generate_app = typer.Typer(help="Make instruction data: Alpaca's self-instruct.",
                           no_args_is_help=True)
app.add_typer(generate_app, name="generate")

BaseUrlOption = typer.Option(
    None, "--base-url", help="OpenAI-compatible endpoint (default: offline llama.cpp SmolLM2).")
ConcurrencyOption = typer.Option(None, "--concurrency", min=1, help="Requests in flight.")
RpmOption = typer.Option(None, "--rpm", min=1, help="Cluster-wide requests/min.")
TpmOption = typer.Option(None, "--tpm", min=1, help="Cluster-wide tokens/min.")


def _endpoint(section: str, base_url: str | None, model: str | None, concurrency: int | None,
              rpm: int | None, tpm: int | None) -> dict[str, Any]:
    return {f"{section}.endpoint.base_url": base_url, f"{section}.endpoint.model": model,
            f"{section}.resources.concurrency": concurrency, f"{section}.endpoint.rpm": rpm,
            f"{section}.endpoint.tpm": tpm}


@generate_app.command("self-instruct")
def self_instruct(
    seeds: str = typer.Option(..., "--seeds", help="Seed tasks JSONL (Alpaca's seed_tasks)."),
    count: int = typer.Option(..., "--count", min=1, help="Generated tasks to keep."),
    run_id: str | None = RunIdOption,
    store: str | None = StoreOption,
    base_url: str | None = BaseUrlOption,
    model: str | None = typer.Option(None, "--model", help="Default gpt-3.5-turbo-instruct."),
    route: str | None = typer.Option(
        None, "--route", help="completions (Alpaca's raw continuation) or chat."),
    prompt: Path | None = typer.Option(
        None, "--prompt", exists=True, dir_okay=False, help="Replaces Alpaca's prompt.txt."),
    requests_per_round: int | None = typer.Option(None, "--requests-per-round", min=1),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1),
    max_rounds: int | None = typer.Option(
        None, "--max-rounds", min=1, help="Stop after this many rounds even short of --count."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the in-context sampling."),
    concurrency: int | None = ConcurrencyOption,
    rpm: int | None = RpmOption,
    tpm: int | None = TpmOption,
    force: bool = ForceOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Grow a pool from seed tasks with Alpaca's self-instruct; kept tasks become the run's
    examples (rate, score, embed and select them with --run-id)."""
    if route not in (None, "completions", "chat"):
        fail(f"--route must be completions or chat, not {route!r}")
    config = build_config(config_file, **{
        "store.url": store, **_endpoint("generate", base_url, model, concurrency, rpm, tpm),
        "generate.route": route, "generate.prompt_file": str(prompt) if prompt else None,
        "generate.requests_per_round": requests_per_round, "generate.max_tokens": max_tokens,
        "generate.max_rounds": max_rounds, "generate.seed": seed,
        "generate.force": True if force else None})
    from gleaner.flows.generate_flow import run_generate
    from gleaner.runs import new_run_id
    from gleaner.tasks.generate.selfinstruct import describe

    summary = run_or_fail(run_generate, config, run_id or config.run_id or new_run_id(), seeds,
                          count)
    emit(summary, as_json, describe(summary))


def describe_regeneration(summary: dict[str, Any]) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in summary.get("failures", {}).items())
    cost = f"${summary['est_cost_usd']:.4f}" if summary.get("price_known") else "price unknown"
    text = (f"run {summary['run_id']}: {summary['answered']:,} of {summary['examples']:,} "
            f"answered by {summary['teacher_model']} ({summary['truncated']:,} cut at "
            f"{summary['max_tokens']} tokens), failed {summary['failed']:,}"
            + (f" ({failures})" if failures else "") + f", {summary['cached']:,} from the cache\n"
            f"{summary['requests']:,} requests, {summary['prompt_tokens']:,} prompt + "
            f"{summary['completion_tokens']:,} completion tokens, est. cost {cost}")
    into = summary.get("into")
    if into:
        text += (f"\ntraining run {into['run_id']} (--keep {into['keep']}): {into['kept']:,} "
                 f"examples, {into['quarantined']:,} quarantined, {into['duplicates']:,} "
                 f"duplicates -> gleaner rate --run-id {into['run_id']}")
    answers = summary.get("answers")
    if answers:
        text += (f"\nanswer files ({answers['rows']:,} rows): gleaner evaluate --answers-a "
                 f"{answers['teacher']} --answers-b {answers['original']}")
    return text


@app.command("regenerate")
def regenerate(
    run_id: str = typer.Option(..., "--run-id", help="The run whose examples to answer again."),
    teacher_model: str | None = typer.Option(None, "--teacher-model", help="Default gpt-4."),
    store: str | None = StoreOption,
    base_url: str | None = BaseUrlOption,
    keep: str | None = typer.Option(
        None, "--keep", help="original | teacher (default) | both: the training response."),
    into: str | None = typer.Option(
        None, "--into", help="The run that gets the chosen responses as its examples "
        "(default: <run-id>-<keep>)."),
    answers_out: str | None = typer.Option(
        None, "--answers-out", help="Write teacher.jsonl and original.jsonl here, for "
        "gleaner evaluate --answers-a/--answers-b."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0),
    batch_size: int | None = RowsPerBatchOption,
    concurrency: int | None = ConcurrencyOption,
    rpm: int | None = RpmOption,
    tpm: int | None = TpmOption,
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Answer every example of a run again with a teacher model (GPT-4-LLM), keep the original
    beside it, and write the chosen responses as another run."""
    if keep not in (None, "original", "teacher", "both"):
        fail(f"--keep must be original, teacher or both, not {keep!r}")
    config = build_config(config_file, **{
        "store.url": store,
        **_endpoint("regenerate", base_url, teacher_model, concurrency, rpm, tpm),
        "regenerate.keep": keep, "regenerate.max_tokens": max_tokens,
        "regenerate.temperature": temperature, "regenerate.resources.batch_size": batch_size,
        **stage_flags("regenerate", force, no_cache, retry_failed)})
    from gleaner.flows.generate_flow import run_regenerate
    from gleaner.store import Store

    if not Store(config.store.url, config.store.options).has_stage(run_id, "ingest"):
        fail(f"run {run_id!r} has no examples in {config.store.url}; run gleaner ingest or "
             "gleaner generate first")
    into = into or f"{run_id}-{config.regenerate.keep}"
    summary = run_or_fail(run_regenerate, config, run_id, into, answers_out)
    emit(summary, as_json, describe_regeneration(summary))
