"""``gleaner dpo train``: a policy trained on the comparison pairs with DPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    StoreOption,
    TrainGpusOption,
    app,
    build_config,
    emit,
    run_or_fail,
)
from gleaner.flows.cli_app import fail as fail_with
from gleaner.flows.commands.reward import (
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

dpo_app = typer.Typer(help="DPO: train a policy on the run's comparison pairs.",
                      no_args_is_help=True)
app.add_typer(dpo_app, name="dpo")


def train_text(s: dict[str, Any]) -> str:
    if s.get("reused"):
        return f"run {s['run_id']}: the DPO model is already trained ({s['model']}); --force"
    d, accuracy, loss = s["data"], s.get("reward_accuracy"), s.get("final_loss")
    return (f"run {s['run_id']}: DPO (beta {s['beta']}) from {s['start']} on "
            f"{d['train_pairs']:,} pairs ({d['heldout_pairs']:,} held out, {d['trimmed']:,} "
            f"trimmed): {s['steps']} steps, final loss "
            f"{'n/a' if loss is None else f'{loss:.4f}'}, implicit reward "
            f"accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}, "
            f"{s['tokens_per_s']} tokens/s on {s['device']}\n  model: {s['model']}")


@dpo_app.command("train")
def train(
    run_id: str = typer.Option(..., "--run-id", help="The run whose comparison pairs to use."),
    store: str | None = StoreOption,
    base_model: str | None = typer.Option(
        None, "--base-model", help="Start from this model (HF id, folder or .gguf) instead of "
        "the run's fine-tuned one."),
    sft_model: str | None = typer.Option(
        None, "--sft-model", help="The run's fine-tuned model to start from (default curated)."),
    preferences: str | None = typer.Option(
        None, "--preferences", help="Train on a published preference dataset (NAME or "
        "NAME@N, from gleaner preferences) instead of the run's comparison pairs."),
    beta: float | None = typer.Option(None, "--beta", help="DPO's beta (default 0.1)."),
    preset: str | None = typer.Option(None, "--preset", help="dpo (default), alpaca, lima."),
    heldout: float | None = typer.Option(None, "--heldout", min=0.0, max=0.99,
                                         help="Share of prompts held out (default 0.1)."),
    max_steps: int | None = MaxStepsOption, epochs: float | None = EpochsOption,
    learning_rate: float | None = LearningRateOption, max_length: int | None = MaxLengthOption,
    batch_size: int | None = BatchSizeOption, per_device_batch_size: int | None = MicroBatchOption,
    num_workers: int | None = WorkersOption, gpu: bool | None = GpuOption,
    num_gpus: int | None = TrainGpusOption,
    force: bool = RetrainOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Train a policy with DPO (TRL's DPOTrainer) on Ray Train; the result is a model like a
    fine-tuned one (``gleaner evaluate --model-a dpo``)."""
    if preset not in (None, "dpo", "alpaca", "lima"):
        fail_with(f"--preset must be dpo, alpaca or lima, not {preset!r}")
    if beta is not None and beta <= 0:
        fail_with(f"--beta must be above 0, not {beta}")
    recipe = recipe_flags(max_steps, epochs, learning_rate, max_length, batch_size,
                          per_device_batch_size)
    config = build_config(config_file, **{
        "store.url": store, "dpo.heldout_fraction": heldout, "dpo.beta": beta,
        "dpo.sft_model": sft_model, "dpo.preferences": preferences,
        **trainer_overrides("dpo", base_model=base_model, preset=preset,
                            num_workers=num_workers, gpu=gpu, force=force, recipe=recipe,
                            num_gpus=num_gpus)})
    from gleaner.flows.dpo_flow import run_dpo_train

    summary = run_or_fail(run_dpo_train, config, run_id)
    emit(summary, as_json, train_text(summary))
