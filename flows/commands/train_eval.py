"""``gleaner finetune`` and ``gleaner evaluate``: thin layers over their flows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    BatchAPIOption,
    ConfigOption,
    JsonOption,
    StoreOption,
    TrainGpusOption,
    app,
    build_config,
    emit,
    fail,
    training_gpus,
)


def finetune_text(result: dict[str, Any]) -> str:
    lines = [f"run {next(iter(result.values()))['run_id']}: fine-tuned"]
    for name, s in result.items():
        state = "already trained (reused)" if s.get("reused") else (
            f"{s['steps']} steps, final loss {s['final_loss']:.4f}, "
            f"{s['tokens_per_s']} tokens/s, {s['wall_seconds']} s")
        data = s["data"]
        lines.append(f"  {name}: {data['examples']} examples ({data['trimmed']} trimmed, "
                     f"{data['dropped_no_response_tokens']} with no response token left) - "
                     f"{state}\n    model: {s['model']}")
    return "\n".join(lines)


def run_examples(config: Any, run_id: str, dataset: str | None) -> int | None:
    """How many examples the run's fine-tune trains on (its curated set), or None when the
    store does not hold them yet."""
    from gleaner.store import Store
    from gleaner.tasks.train.run import resolve_dataset

    try:
        return resolve_dataset(Store(config.store.url, config.store.options), run_id, config,
                               dataset).num_rows
    except (FileNotFoundError, ValueError):
        return None


def finetune_plan(config: Any, examples: int) -> Any:
    """The memory plan of the curated model's fine-tune (the baseline has the same size)."""
    from gleaner.tasks.train.memory_plan import plan_for_section
    from gleaner.tasks.train.run import base_model_source

    try:
        return plan_for_section(config.finetune, base_model_source(config.finetune.base_model),
                                examples)
    except ValueError as error:
        fail(str(error))


def refuse_before_starting(config: Any, run_id: str, dataset: str | None) -> None:
    """Refuse a fine-tune that cannot fit, or that asks the trainer for a layout it cannot run,
    before the Prefect API or Ray is started (the flow checks again; a run whose examples are
    not in the store yet is left to the flow's own message)."""
    from gleaner.tasks.train.run import base_model_source, check_layout

    try:
        check_layout(config.finetune, "finetune", base_model_source(config.finetune.base_model))
    except ValueError as error:
        fail(str(error))
    count = run_examples(config, run_id, dataset)
    if count is None:
        return
    memory = finetune_plan(config, max(1, count))
    if not memory.fits:
        fail("fine-tuning refused before any worker starts: " + "; ".join(memory.reasons))


@app.command("finetune")
def finetune(
    run_id: str | None = typer.Option(None, "--run-id",
                                      help="The run whose curated set to train on."),
    store: str | None = StoreOption,
    preset: str | None = typer.Option(None, "--preset", help="alpaca (default) or lima."),
    base_model: str | None = typer.Option(
        None, "--base-model", help="HF id, local folder or .gguf (default: SmolLM2-135M)."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="none, pool (whole pool) or random (same size as curated)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Stage to train on (default: the selection)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1),
    epochs: float | None = typer.Option(None, "--epochs", min=0.01),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "--lr"),
    max_length: int | None = typer.Option(None, "--max-length", min=8),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Effective batch size."),
    per_device_batch_size: int | None = typer.Option(None, "--per-device-batch-size", min=1),
    num_workers: int | None = typer.Option(None, "--num-workers", min=1,
                                           help="Ray Train workers (one GPU each with --gpu)."),
    gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="Train on GPUs."),
    num_gpus: int | None = TrainGpusOption,
    strategy: str | None = typer.Option(None, "--strategy", help="ddp, fsdp or deepspeed."),
    peft: str | None = typer.Option(None, "--peft", help="none, lora or qlora."),
    gpu_memory_gb: float | None = typer.Option(None, "--gpu-memory-gb", min=1,
                                               help="Each GPU's memory, for the plan."),
    plan: bool = typer.Option(False, "--plan", help="Print the memory plan; train nothing."),
    examples: int | None = typer.Option(None, "--examples", min=1,
                                        help="--plan: examples to plan for."),
    force: bool = typer.Option(False, "--force", help="Retrain even if the model exists."),
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Fine-tune the base model on the run's curated set (and a baseline) on Ray Train.

    Every run is planned first (per-GPU memory, batch arithmetic, steps: docs/gpu.md) and
    refused, before Ray is asked for anything, when it cannot fit."""
    if preset not in (None, "alpaca", "lima"):
        fail(f"--preset must be alpaca or lima, not {preset!r}")
    if baseline not in (None, "none", "pool", "random"):
        fail(f"--baseline must be none, pool or random, not {baseline!r}")
    num_workers, gpu = training_gpus(num_gpus, num_workers, gpu)
    config = build_config(config_file, check_store=not plan, **{
        "store.url": store, "finetune.preset": preset, "finetune.base_model": base_model,
        "finetune.baseline": baseline, "finetune.num_workers": num_workers,
        "finetune.use_gpu": gpu, "finetune.force": True if force else None,
        "finetune.strategy": strategy, "finetune.peft": peft,
        "finetune.gpu_memory_gb": gpu_memory_gb})
    overrides = {"max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate,
                 "max_length": max_length, "effective_batch_size": batch_size,
                 "per_device_batch_size": per_device_batch_size}
    config.finetune.overrides.update({k: v for k, v in overrides.items() if v is not None})
    if plan:
        from gleaner.tasks.train.memory_plan import plan_text

        count = examples or (run_examples(config, run_id, dataset) if run_id else None)
        if count is None:
            fail("--plan needs --examples N, or --run-id ID of a run whose curated set is in "
                 "the store")
        memory = finetune_plan(config, count)
        emit(memory.as_dict(), as_json, plan_text(memory))
        raise typer.Exit(0 if memory.fits else 1)
    if not run_id:
        fail("--run-id is required (or --plan with --examples)")
    refuse_before_starting(config, run_id, dataset)

    from gleaner.flows.finetune_flow import finetune_flow
    from gleaner.runtime import execution_environment

    try:
        with execution_environment(config):
            result = finetune_flow(run_id=run_id, config=config, dataset=dataset)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        fail(str(error))
    emit(result, as_json, finetune_text(result))


ANSWERS_HELP = "JSONL with prompt, answer and optional id (and test_set)."


def evaluate_text(summary: dict[str, Any]) -> str:
    text = summary["markdown"]
    if summary.get("only_in_a") or summary.get("only_in_b"):
        text += (f"\nunmatched rows: {summary['only_in_a']} only in A, {summary['only_in_b']} "
                 f"only in B (joined by {summary['join_key']})\n")
    return text + f"\nreport: {summary['report']}\nchart: {summary['chart']}"


def evaluate_json(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("win", "tie", "lose", "failed", "winning_score", "win_rate", "lc_win_rate",
            "prompt_tokens", "completion_tokens", "cost_usd")
    result = {k: v for k, v in summary.items() if k not in ("markdown", "unmatched")}
    result["test_sets"] = {n: {k: t[k] for k in keys} for n, t in summary["test_sets"].items()}
    result["overall"] = {k: summary["overall"][k] for k in keys}
    return result


@app.command("evaluate")
def evaluate(
    run_id: str | None = typer.Option(None, "--run-id", help="Run to evaluate / record into."),
    store: str | None = StoreOption,
    model_a: str | None = typer.Option(
        None, "--model-a", help="Model under test: a trained name (curated), base, folder, HF id."),
    model_b: str | None = typer.Option(None, "--model-b", help="The baseline model."),
    answers_a: str | None = typer.Option(None, "--answers-a", help=ANSWERS_HELP),
    answers_b: str | None = typer.Option(None, "--answers-b", help=ANSWERS_HELP),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url"),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Default gpt-4."),
    rule: str | None = typer.Option(None, "--rule", help="alpagasus (default) or fastchat."),
    test_sets: list[str] | None = typer.Option(
        None, "--test-sets", "--test-set",
        help="koala, vicuna, wizardlm, sinstruct, mt_bench, or a prompt JSONL (repeatable)."),
    test_sets_dir: str | None = typer.Option(None, "--eval-sets-dir"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N prompts per set."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1),
    force: bool = typer.Option(False, "--force", help="Regenerate and rejudge."),
    likert: bool = typer.Option(False, "--likert", help="Also rate every answer on LIMA's "
                                "6-point helpfulness scale: mean and 95 % CI per model."),
    likert_samples: int | None = typer.Option(
        None, "--likert-samples", min=1,
        help="--likert: answers sampled per prompt (above 1 needs evaluate.generation.do_sample)."),
    batch_api: bool = BatchAPIOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Judge model A against model B (or two answer files) in both orders; print W/T/L."""
    if rule not in (None, "alpagasus", "fastchat"):
        fail(f"--rule must be alpagasus or fastchat, not {rule!r}")
    if bool(answers_a) != bool(answers_b):
        fail("give both --answers-a and --answers-b, or neither")
    config = build_config(config_file, **{
        "store.url": store, "run_id": run_id, "evaluate.endpoint.base_url": judge_base_url,
        "evaluate.endpoint.model": judge_model, "evaluate.rule": rule,
        "evaluate.test_sets_dir": test_sets_dir, "evaluate.limit": limit,
        "evaluate.generation.max_tokens": max_new_tokens, "evaluate.force": True if force else None,
        "evaluate.test_sets": test_sets or None,
        "evaluate.endpoint.api": "batch" if batch_api else None,
        "evaluate.likert.enabled": True if likert else None,
        "evaluate.likert.samples": likert_samples})

    from gleaner.flows.evaluate_flow import evaluate_flow
    from gleaner.runs import new_run_id
    from gleaner.runtime import execution_environment
    from gleaner.tasks.evaluate.answers import AnswerFileError
    from gleaner.tasks.evaluate.eval_sets import EvalSetError

    try:
        with execution_environment(config):  # the judge stage's batches run on Ray
            summary = evaluate_flow(run_id=config.run_id or new_run_id(), config=config,
                                    model_a=model_a, model_b=model_b, answers_a=answers_a,
                                    answers_b=answers_b)
    except (AnswerFileError, EvalSetError, ValueError, FileNotFoundError, RuntimeError) as error:
        fail(str(error))
    emit(evaluate_json(summary), as_json, evaluate_text(summary))
