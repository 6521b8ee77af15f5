"""DPO on a run's comparison pairs: the SFT model (or a named base) to a preference-tuned one.

``gleaner dpo train --run-id ID`` reads the pairs ``gleaner compare`` wrote, keeps whole
prompts aside (``dpo.heldout_fraction``), turns the rest into preference rows in the policy's
own format (tasks/compare/preferences.py) and trains on the shared Ray Train runner with
:class:`~gleaner.tasks.dpo.objective.DirectPreference`. The result is a model like any
fine-tuned one, ``runs/<id>/finetune/<dpo.name>/model``: ``gleaner evaluate --model-a dpo``
answers with it and judges it.
"""

from __future__ import annotations

import posixpath
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import run_step
from gleaner.runs import record_run
from gleaner.runtime import STATE_DIR
from gleaner.store import Store
from gleaner.tasks.compare.preferences import preference_rows, preference_set, run_pairs
from gleaner.tasks.dpo.objective import DirectPreference
from gleaner.tasks.evaluate.run import model_identity
from gleaner.tasks.publish.preferences import version_pairs
from gleaner.tasks.train.model_card import model_card
from gleaner.tasks.train.run import (
    TrainStep,
    fit_and_publish,
    load_base,
    model_path,
    table_version,
)
from gleaner.tasks.train.sft_data import FORMAT_FILE, SftFormat, prepare_tokenizer


def starting_model(store: Store, run_id: str, config: GleanerConfig) -> tuple[str, str]:
    """(path, description) of the policy's start: ``dpo.base_model`` when named, else the
    run's SFT model (``dpo.sft_model``), copied here when the store is remote."""
    settings = config.dpo
    if settings.base_model:
        return settings.base_model, settings.base_model
    remote = model_path(store, run_id, settings.sft_model)
    if not store.exists(posixpath.join(remote, "config.json")):
        raise FileNotFoundError(
            f"run {run_id!r} has no fine-tuned model {settings.sft_model!r} in {store.url} to "
            "start DPO from: run gleaner finetune first, or name one with --base-model")
    described = f"run `{run_id}`'s `{settings.sft_model}` model"
    if store.is_local:
        return remote, described
    local = STATE_DIR / "models" / f"{run_id}-{settings.sft_model}"
    shutil.rmtree(local, ignore_errors=True)  # no shard of an earlier copy may stay
    store.fs.get(remote.rstrip("/") + "/", str(local), recursive=True)
    return str(local), described


def policy_format(source: str, fallback: SftFormat) -> SftFormat:
    """The format the starting model was fine-tuned with (saved beside it), else the recipe's."""
    saved = Path(source) / FORMAT_FILE
    return SftFormat.from_json(saved.read_text()) if saved.exists() else fallback


def run_dpo_train(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Train the policy on the run's pairs (held-out prompts kept aside); returns the summary."""
    settings = config.dpo
    name = settings.name
    pairs_run = settings.pairs_run or run_id
    published = version_pairs(store, settings.preferences) if settings.preferences else None
    pairs, train_pairs, heldout_pairs = run_pairs(store, pairs_run, settings.heldout_fraction,
                                                  settings.seed, "dpo", published)
    if settings.preferences:
        pairs_run = f"dataset:{settings.preferences}"
    start = settings.base_model or f"{settings.sft_model}@" + model_identity(
        store, run_id, config, settings.sft_model)
    step = TrainStep(name, settings, table_version(pairs), "dpo",
                     lambda: _dpo(store, run_id, config, pairs_run, pairs, train_pairs,
                                  heldout_pairs),
                     "dpo.force", start=start, beta=settings.beta,
                     heldout_fraction=settings.heldout_fraction, seed=settings.seed)
    return run_step(store, run_id, step, force=settings.force)


def _dpo(store: Store, run_id: str, config: GleanerConfig, pairs_run: str, pairs: Any,
         train_pairs: Any, heldout_pairs: Any) -> dict[str, Any]:
    settings = config.dpo
    name = settings.name
    summary_path = layout.finetune_file(store, run_id, name, "summary.json")
    source, described = starting_model(store, run_id, config)
    base, tokenizer, recipe, recipe_format = load_base(source, settings.preset,
                                                       settings.overrides)
    fmt = policy_format(base, recipe_format)
    prepare_tokenizer(tokenizer, fmt)
    encoded = preference_set(preference_rows(train_pairs.to_pylist(), tokenizer, fmt),
                             tokenizer, recipe.max_length)
    def card(folder: Path, metrics: dict[str, Any]) -> None:
        (folder / "README.md").write_text(model_card(
            name=name, run_id=run_id, base_model=described,
            recipe={**recipe.as_dict(), "beta": settings.beta}, metrics=metrics,
            layout={"strategy": settings.strategy, "peft": settings.peft},
            trained_on=(f"DPO (Rafailov et al. 2023, beta {settings.beta}) from {described} "
                        f"on {encoded.pairs} comparison pairs of `{pairs_run}` "
                        f"({heldout_pairs.num_rows} held out, {encoded.trimmed} cut to "
                        "max_length).")))

    fitted = fit_and_publish(
        store, run_id, config, settings, "dpo", name, what="DPO training", base=base,
        tokenizer=tokenizer, fmt=fmt, recipe=recipe, table=encoded.table,
        examples=encoded.pairs, objective=DirectPreference(beta=settings.beta), beside=card)
    metrics, outcome = fitted.metrics, fitted.outcome
    trainer_metrics = outcome.state.get("trainer_metrics", {})
    summary = {
        "run_id": run_id, "name": name, "start": described, "beta": settings.beta,
        "pairs_run": pairs_run,
        "preset": recipe.preset, "recipe": recipe.as_dict(),
        "data": {"pairs": pairs.num_rows, "train_pairs": encoded.pairs,
                 "heldout_pairs": heldout_pairs.num_rows, "trimmed": encoded.trimmed,
                 "tokens": encoded.tokens},
        "reward_accuracy": trainer_metrics.get("rewards/accuracies"),
        "reward_margin": trainer_metrics.get("rewards/margins"),
        "model": store.uri(model_path(store, run_id, name)),
        "checkpoints": fitted.checkpoints,
        "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None,
        **{k: metrics[k] for k in ("steps", "tokens_per_s", "train_seconds", "wall_seconds",
                                   "gpu_max_memory_bytes", "device", "strategy", "peft",
                                   "world_size", "dtype", "resumed_from_step")},
    }
    store.write_json(summary_path, summary)
    record_run(store, run_id, config, dpo={k: summary[k] for k in (
        "model", "steps", "final_loss", "reward_accuracy", "beta")})
    return summary


@task(name="dpo-model", retries=0)
def dpo_train_task(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The DPO policy as one task run (retries are Ray Train's, from checkpoints)."""
    return run_dpo_train(Store(config.store.url, config.store.options), run_id, config)
