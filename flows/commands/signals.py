"""``gleaner ifd`` and ``gleaner length`` (selection signals for IFD and Long-is-more), and a
verb for every stage of the pool-stage registry (``gleaner tag``: InsTag)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from gleaner.engine.catalog import PoolStage, StageFlag, pool_stages
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
def flag_values(entry: PoolStage, given: dict[str, Any]) -> dict[str, Any]:
    """The stage's own flags as config overrides (a list flag: repeated or comma-separated)."""
    out: dict[str, Any] = {}
    for flag in entry.flags:
        value = given.get(parameter_name(flag))
        if value is not None and flag.many:
            value = [part.strip() for item in value for part in item.split(",") if part.strip()]
            value = value or None
        out[flag.key] = value
    return out


def parameter_name(flag: StageFlag) -> str:
    return flag.flag.lstrip("-").replace("-", "_")


def pool_stage_command(name: str, entry: PoolStage) -> Callable[..., None]:
    """``gleaner <verb> --run-id ID``: the stage over the run's examples, with the engine's
    switches, the stage's own flags and, for an LLM stage (one with offline roles), its
    endpoint (none: gleaner's offline server)."""
    section = entry.section

    def command(**given: Any) -> None:
        run_id, as_json = given["run_id"], given["as_json"]
        endpoint = {f"{section}.endpoint.base_url": given.get("base_url"),
                    f"{section}.endpoint.model": given.get("model")} if entry.roles else {}
        config = build_config(given["config_file"], **{
            "store.url": given["store"], f"{section}.resources.batch_size": given["batch_size"],
            **endpoint, **flag_values(entry, given),
            **stage_flags(section, given["force"], given["no_cache"], given["retry_failed"])})
        from gleaner.flows.signal_flows import run_pool_stage

        summary = run_or_fail(run_pool_stage, name, run_id, config)
        emit(summary, as_json, f"run {run_id}: {entry.describe(summary)}")

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("run_id", keyword, default=InputRunOption, annotation=str),
                  inspect.Parameter("store", keyword, default=StoreOption,
                                    annotation=str | None)]
    if entry.roles:
        parameters += [
            inspect.Parameter("base_url", keyword, annotation=str | None, default=typer.Option(
                None, "--base-url", help="OpenAI-compatible endpoint (default: offline SmolLM2).")),
            inspect.Parameter("model", keyword, annotation=str | None, default=typer.Option(
                None, "--model", help="Model name at the endpoint."))]
    for flag in entry.flags:
        parameters.append(inspect.Parameter(
            parameter_name(flag), keyword, default=typer.Option(None, flag.flag, help=flag.help),
            annotation=list[flag.type] | None if flag.many else flag.type | None))
    parameters += [
        inspect.Parameter("batch_size", keyword, default=RowsPerBatchOption, annotation=int | None),
        inspect.Parameter("force", keyword, default=ForceOption, annotation=bool),
        inspect.Parameter("no_cache", keyword, default=NoCacheOption, annotation=bool),
        inspect.Parameter("retry_failed", keyword, default=RetryFailedOption, annotation=bool),
        inspect.Parameter("config_file", keyword, default=ConfigOption, annotation=Path | None),
        inspect.Parameter("as_json", keyword, default=JsonOption, annotation=bool)]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = entry.help
    return command


for _name, _entry in pool_stages().items():
    app.command(_entry.verb)(pool_stage_command(_name, _entry))
