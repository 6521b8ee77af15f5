"""``gleaner evol complexity|quality`` and ``gleaner scorer train complexity|quality`` (DEITA)."""

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
    TrainGpusOption,
    app,
    build_config,
    emit,
    fail,
    run_or_fail,
    stage_flags,
)
from gleaner.flows.commands.reward import (
    BaseModelOption,
    BatchSizeOption,
    EpochsOption,
    GpuOption,
    LearningRateOption,
    MaxLengthOption,
    MaxStepsOption,
    MicroBatchOption,
    RetrainOption,
    WorkersOption,
    recipe_flags,
    trainer_overrides,
)

KindArgument = typer.Argument(..., help="complexity (instructions) or quality (responses).")
scorer_app = typer.Typer(help="DEITA's scorers trained on EVOL data.", no_args_is_help=True)
app.add_typer(scorer_app, name="scorer")


def _kind(kind: str) -> str:
    if kind not in ("complexity", "quality"):
        fail(f"the kind must be complexity or quality, not {kind!r}")
    return kind


def evol_text(s: dict[str, Any]) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in s.get("failures", {}).items())
    scores = " ".join(f"{k}:{v}" for k, v in (s.get("score_counts") or {}).items())
    return (f"run {s['run_id']}: EVOL {s['kind']} of {s['seeds']:,} seeds, {s['rounds']} rounds "
            f"with {s['model']}: {s['chains_ok']:,} chains ok, {s['chains_failed']:,} failed"
            + (f" ({failures})" if failures else "") + f", {s['cached']:,} from the cache\n"
            f"{s['items']:,} (text, score) items (scores {scores}) in {s['items_path']}\n"
            f"{s['requests']:,} requests, est. ${s['est_cost_usd']:.4f}")


@app.command("evol")
def evol(
    kind: str = KindArgument,
    run_id: str = typer.Option(..., "--run-id", help="The run whose examples are the seeds."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, max=5, help="M (default 4)."),
    store: str | None = StoreOption,
    base_url: str | None = typer.Option(
        None, "--base-url", help="OpenAI-compatible rewriter (default: offline llama.cpp)."),
    model: str | None = typer.Option(None, "--model", help="Model name at the endpoint."),
    batch_size: int | None = RowsPerBatchOption,
    concurrency: int | None = typer.Option(None, "--concurrency", min=1),
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Evolve every seed M times with DEITA's rewriter, rank-and-score the M+1 versions."""
    kind = _kind(kind)
    config = build_config(config_file, **{
        "store.url": store, "evol.rounds": rounds, "evol.endpoint.base_url": base_url,
        "evol.endpoint.model": model, "evol.resources.batch_size": batch_size,
        "evol.resources.concurrency": concurrency,
        **stage_flags("evol", force, no_cache, retry_failed)})
    from gleaner.flows.evol_flow import run_evol
    from gleaner.store import Store

    if not Store(config.store.url, config.store.options).has_stage(run_id, "ingest"):
        fail(f"run {run_id!r} has no ingested examples in {config.store.url}; run gleaner ingest")
    summary = run_or_fail(run_evol, config, run_id, kind)
    emit(summary, as_json, evol_text(summary))


def scorer_text(r: dict[str, Any]) -> str:
    rep = r["report"]
    state = "already trained (reused)" if r.get("reused") else (
        f"{r['steps']} steps, final loss {r['final_loss']:.4f}, {r['tokens_per_s']} tokens/s")
    return (f"run {r['run_id']}: {r['kind']} scorer on {r['train_items']:,} of {r['items']:,} "
            f"items ({r['seeds']:,} seeds): {state}\nagainst its teacher on "
            f"{rep['heldout_items']:,} held-out items: Spearman {rep['spearman']}, MAE "
            f"{rep['mae']}\n  model: {rep['model']}\n  use: {rep['use']}")


@scorer_app.command("train")
def train(
    kind: str = KindArgument,
    run_id: str = typer.Option(..., "--run-id", help="The run whose EVOL items to train on."),
    store: str | None = StoreOption,
    base_model: str | None = BaseModelOption,
    preset: str | None = typer.Option(None, "--preset", help="alpaca (default) or lima."),
    heldout: float | None = typer.Option(None, "--heldout", min=0.0, max=0.99,
                                         help="Share of seeds held out (default 0.1)."),
    max_steps: int | None = MaxStepsOption, epochs: float | None = EpochsOption,
    learning_rate: float | None = LearningRateOption, max_length: int | None = MaxLengthOption,
    batch_size: int | None = BatchSizeOption, per_device_batch_size: int | None = MicroBatchOption,
    num_workers: int | None = WorkersOption, gpu: bool | None = GpuOption,
    num_gpus: int | None = TrainGpusOption,
    force: bool = RetrainOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Fine-tune a causal LM to answer DEITA's scorer prompt with the score; report on held-out
    items (Spearman, MAE against the ranker)."""
    kind = _kind(kind)
    if preset not in (None, "alpaca", "lima"):
        fail(f"--preset must be alpaca or lima, not {preset!r}")
    recipe = recipe_flags(max_steps, epochs, learning_rate, max_length, batch_size,
                          per_device_batch_size)
    config = build_config(config_file, **{
        "store.url": store, "evol.scorer.heldout_fraction": heldout,
        **trainer_overrides("evol.scorer", base_model=base_model, preset=preset,
                            num_workers=num_workers, gpu=gpu, force=force, recipe=recipe,
                            num_gpus=num_gpus)})
    from gleaner.flows.evol_flow import run_scorer_train

    result = run_or_fail(run_scorer_train, config, run_id, kind)
    emit(result, as_json, scorer_text(result))
