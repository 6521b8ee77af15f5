"""``gleaner ifd`` and ``gleaner length`` (selection signals for IFD and Long-is-more), and a
verb for every stage of the pool-stage registry (``gleaner tag``: InsTag)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from gleaner.engine.catalog import PoolStage, pool_stages
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


# ---- every registered pool stage gets its verb (gleaner.engine.catalog) ---------------------
def pool_stage_command(name: str, entry: PoolStage) -> Callable[..., None]:
    """``gleaner <verb> --run-id ID``: the stage over the run's examples, with the engine's
    switches and, for an LLM stage, its endpoint (none: gleaner's offline server)."""

    def command(
        run_id: str = InputRunOption,
        store: str | None = StoreOption,
        base_url: str | None = typer.Option(
            None, "--base-url", help="OpenAI-compatible endpoint (default: offline SmolLM2)."),
        model: str | None = typer.Option(None, "--model", help="Model name at the endpoint."),
        batch_size: int | None = RowsPerBatchOption,
        force: bool = ForceOption,
        no_cache: bool = NoCacheOption,
        retry_failed: bool = RetryFailedOption,
        config_file: Path | None = ConfigOption,
        as_json: bool = JsonOption,
    ) -> None:
        section = entry.section
        endpoint = {f"{section}.endpoint.base_url": base_url, f"{section}.endpoint.model": model}
        config = build_config(config_file, **{
            "store.url": store, f"{section}.resources.batch_size": batch_size, **endpoint,
            **stage_flags(section, force, no_cache, retry_failed)})
        from gleaner.flows.signal_flows import run_pool_stage

        summary = run_or_fail(run_pool_stage, name, run_id, config)
        emit(summary, as_json, f"run {run_id}: {entry.describe(summary)}")

    command.__doc__ = entry.help
    return command


for _name, _entry in pool_stages().items():
    app.command(_entry.verb)(pool_stage_command(_name, _entry))
