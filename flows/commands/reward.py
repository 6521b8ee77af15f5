"""``gleaner reward train`` and ``gleaner reward score``: the reward model (GPT-4-LLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ActorsOption,
    ConfigOption,
    ForceOption,
    JsonOption,
    NoCacheOption,
    NumGpusOption,
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
    training_gpus,
)

reward_app = typer.Typer(help="The reward model: train it on comparison pairs, score a run.",
                         no_args_is_help=True)
app.add_typer(reward_app, name="reward")

BaseModelOption = typer.Option(
    None, "--base-model", help="HF id, local folder or .gguf (default: SmolLM2-135M).")
MaxStepsOption = typer.Option(None, "--max-steps", min=1)
EpochsOption = typer.Option(None, "--epochs", min=0.01)
LearningRateOption = typer.Option(None, "--learning-rate", "--lr")
MaxLengthOption = typer.Option(None, "--max-length", min=8)
BatchSizeOption = typer.Option(None, "--batch-size", help="Effective batch size.")
MicroBatchOption = typer.Option(None, "--per-device-batch-size", min=1)
WorkersOption = typer.Option(None, "--num-workers", min=1, help="Ray Train workers.")
GpuOption = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (bf16 where supported).")
RetrainOption = typer.Option(False, "--force", help="Retrain even if the model exists.")


def trainer_overrides(section: str, *, base_model: str | None, preset: str | None,
                      num_workers: int | None, gpu: bool | None, force: bool,
                      recipe: dict[str, Any], num_gpus: int | None = None) -> dict[str, Any]:
    """A training section's CLI flags as config overrides (recipe fields merged later)."""
    num_workers, gpu = training_gpus(num_gpus, num_workers, gpu)
    return {f"{section}.base_model": base_model, f"{section}.preset": preset,
            f"{section}.num_workers": num_workers, f"{section}.use_gpu": gpu,
            f"{section}.force": True if force else None,
            **{f"{section}.overrides.{k}": v for k, v in recipe.items() if v is not None}}


def recipe_flags(max_steps: int | None, epochs: float | None, learning_rate: float | None,
                 max_length: int | None, batch_size: int | None,
                 per_device_batch_size: int | None) -> dict[str, Any]:
    return {"max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate,
            "max_length": max_length, "effective_batch_size": batch_size,
            "per_device_batch_size": per_device_batch_size}


def train_text(s: dict[str, Any]) -> str:
    if s.get("reused"):
        return f"run {s['run_id']}: the reward model is already trained ({s['model']}); --force"
    d, accuracy, loss = s["data"], s.get("heldout_accuracy"), s.get("final_loss")
    return (f"run {s['run_id']}: reward model trained on {d['train_pairs']:,} pairs "
            f"({d['heldout_pairs']:,} held out, {d['prompts']:,} prompts, {d['trimmed']:,} "
            f"trimmed): {s['steps']} steps, final loss "
            f"{'n/a' if loss is None else f'{loss:.4f}'}, held-out "
            f"pairwise accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}, "
            f"{s['tokens_per_s']} tokens/s on {s['device']}\n  model: {s['model']}")


@reward_app.command("train")
def train(
    run_id: str = typer.Option(..., "--run-id", help="The run whose comparison pairs to use."),
    store: str | None = StoreOption,
    base_model: str | None = BaseModelOption,
    preset: str | None = typer.Option(None, "--preset", help="reward (default), alpaca, lima."),
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
    """Train r(x, y) with -log sigmoid(r(x, y_h) - r(x, y_l)) on Ray Train."""
    if preset not in (None, "reward", "alpaca", "lima"):
        fail(f"--preset must be reward, alpaca or lima, not {preset!r}")
    recipe = recipe_flags(max_steps, epochs, learning_rate, max_length, batch_size,
                          per_device_batch_size)
    config = build_config(config_file, **{
        "store.url": store, "reward.train.heldout_fraction": heldout,
        **trainer_overrides("reward.train", base_model=base_model, preset=preset,
                            num_workers=num_workers, gpu=gpu, force=force, recipe=recipe,
                            num_gpus=num_gpus)})
    from gleaner.flows.reward_flow import run_reward_train

    summary = run_or_fail(run_reward_train, config, run_id)
    emit(summary, as_json, train_text(summary))


@reward_app.command("score")
def score(
    run_id: str = typer.Option(..., "--run-id", help="The run whose examples to score."),
    store: str | None = StoreOption,
    model: str | None = typer.Option(
        None, "--model", help="A reward-model folder (default: the run's trained one)."),
    batch_size: int | None = RowsPerBatchOption,
    actors: int | None = ActorsOption,
    num_gpus: float | None = NumGpusOption,
    force: bool = ForceOption,
    no_cache: bool = NoCacheOption,
    retry_failed: bool = RetryFailedOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Write a ``reward`` for every example (select with --sort-by reward --threshold 0.0)."""
    config = build_config(config_file, **{
        "store.url": store, "reward.model": model, "reward.resources.batch_size": batch_size,
        "reward.resources.actors": actors, "reward.resources.gpus": num_gpus,
        **stage_flags("reward", force, no_cache, retry_failed)})
    from gleaner.flows.reward_flow import run_reward_score

    s = run_or_fail(run_reward_score, config, run_id)
    emit(s, as_json, f"run {run_id}: {s['examples']:,} examples, {s.get('scored', 0):,} scored, "
                     f"{s['failed']:,} failed, {s['cached']:,} from the cache; mean reward "
                     f"{s.get('mean_reward')}, {s.get('above_zero', 0):,} above 0.0 "
                     f"(model {s.get('model')})")
