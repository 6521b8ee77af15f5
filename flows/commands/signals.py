"""``gleaner ifd`` and ``gleaner length``: selection signals for IFD and Long-is-more."""

from __future__ import annotations

from pathlib import Path

import typer

from gleaner.flows.cli_app import (
    ActorsOption,
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
    emit,
    run_or_fail,
    stage_flags,
)


@app.command("ifd")
def ifd(
    run_id: str = InputRunOption,
    store: str | None = StoreOption,
    model: str | None = typer.Option(
        None, "--model",
        help="Causal LM (HF id, folder or .gguf); default: SmolLM2-135M (Superfiltering).",
    ),
    max_length: int | None = typer.Option(None, "--max-length", min=8),
    batch_size: int | None = RowsPerBatchOption,
    actors: int | None = ActorsOption,
    num_gpus: float | None = NumGpusOption,
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """IFD = L(A|Q) / L(A) of every example (Cherry LLM; Superfiltering with a small model)."""
    config = build_config(config_file, **{
        "store.url": store, "ifd.model": model, "ifd.max_length": max_length,
        "ifd.resources.batch_size": batch_size, "ifd.resources.actors": actors,
        "ifd.resources.gpus": num_gpus, **stage_flags("ifd", force, no_cache, retry_failed)})
    from gleaner.flows.signal_flows import run_ifd

    summary = run_or_fail(run_ifd, run_id, config)
    emit(summary, as_json,
         f"run {run_id}: IFD of {summary['scored']:,} examples ({summary['failed']:,} failed), "
         f"mean {summary['mean_ifd']}, {summary['ifd_above_1']:,} above 1 ({summary['model']})")


@app.command("length")
def length(
    run_id: str = InputRunOption,
    store: str | None = StoreOption,
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="HF folder/id or .gguf (default: SmolLM2's tokenizer)."),
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Response length of every example in characters and tokens (Long-is-more)."""
    config = build_config(config_file, **{
        "store.url": store, "length.tokenizer": tokenizer,
        **stage_flags("length", force, no_cache, retry_failed)})
    from gleaner.flows.signal_flows import run_length

    summary = run_or_fail(run_length, run_id, config)
    emit(summary, as_json,
         f"run {run_id}: {summary['ok']:,} responses, mean {summary['mean_response_tokens']} "
         f"tokens / {summary['mean_response_chars']} characters ({summary['tokenizer']})")
