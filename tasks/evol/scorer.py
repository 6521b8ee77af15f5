"""Training DEITA's scorers on EVOL items, and how a trained scorer agrees with its teacher.

A scorer is a causal LM fine-tuned (the SFT machinery of tasks/train, ``raw`` template) to
answer DEITA's scorer prompt (tasks/deita/score.py, verbatim) with the score token: the
training text is the prompt, then the digit the ranker gave, then EOS. It plugs into
``gleaner score`` as the ``hf`` scorer (``--complexity-model`` / ``--quality-model`` the
model folder), which reads sum_k k * softmax(logits of "1".."6") after the prompt.

Held-out items are whole seeds (every version of a held-out seed), so the report measures
texts the scorer never saw, scored in the same ranking context as its teacher. Report:
Spearman's rho and the mean absolute error between the trained scorer's expected score and
the ranker's score, on the held-out items.
"""

from __future__ import annotations

import math
import posixpath
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig, TrainingLayoutSection
from gleaner.store import Store
from gleaner.tasks.deita.score import complexity_prompt, quality_prompt
from gleaner.tasks.evol.items import ITEMS_SCHEMA
from gleaner.tasks.reward.data import heldout_prompts
from gleaner.tasks.train.run import model_path, run_finetune


def scorer_prompt(kind: str, item: dict[str, Any]) -> str:
    if kind == "complexity":
        return complexity_prompt(item["text"])
    return quality_prompt(item["instruction"], item["text"])


def training_records(kind: str, items: list[dict[str, Any]]) -> pa.Table:
    """(scorer prompt -> score digit) as SFT records for the ``raw`` template."""
    return pa.Table.from_pylist([
        {"id": i["id"], "instruction": scorer_prompt(kind, i), "input": "",
         "output": str(i["score"]), "conversation": []} for i in items])


def read_items(store: Store, run_id: str, kind: str) -> pa.Table:
    stage = layout.evol_items_stage(kind)
    if not store.has_stage(run_id, stage):
        raise FileNotFoundError(f"run {run_id!r} has no EVOL {kind} items in {store.url}; "
                                f"run gleaner evol {kind} first")
    return store.read_stage(run_id, stage, schema=ITEMS_SCHEMA)


def split_items(items: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    held = heldout_prompts(items.column("seed_id").to_pylist(), fraction, seed)
    mask = pc.is_in(items.column("seed_id"), value_set=pa.array(sorted(held), pa.string()))
    return items.filter(pc.invert(mask)), items.filter(mask)


def finetune_config(config: GleanerConfig) -> GleanerConfig:
    """The fine-tuning config a scorer is trained with: the scorer's settings, ``raw``."""
    s = config.evol.scorer
    return config.with_overrides({
        "finetune.base_model": s.base_model, "finetune.preset": s.preset,
        "finetune.overrides": {**s.overrides, "template": "raw"},
        "finetune.num_workers": s.num_workers, "finetune.use_gpu": s.use_gpu,
        "finetune.cpus_per_worker": s.cpus_per_worker, "finetune.max_failures": s.max_failures,
        "finetune.force": s.force,
        **{f"finetune.{key}": value for key, value in s.model_dump().items()
           if key in TrainingLayoutSection.model_fields}})


def agreement(predicted: list[float], teacher: list[int]) -> dict[str, Any]:
    """Spearman's rho and MAE of the scorer's expected scores against the teacher's scores."""
    from scipy.stats import spearmanr

    n = len(predicted)
    if n == 0:
        return {"heldout_items": 0, "spearman": None, "mae": None}
    rho = float(spearmanr(predicted, teacher).statistic) if n > 1 else float("nan")
    mae = sum(abs(p - t) for p, t in zip(predicted, teacher, strict=True)) / n
    return {"heldout_items": n, "spearman": None if math.isnan(rho) else round(rho, 4),
            "mae": round(mae, 4), "predicted_mean": round(sum(predicted) / n, 4),
            "teacher_mean": round(sum(teacher) / n, 4)}


def scorer_report(store: Store, run_id: str, config: GleanerConfig, kind: str,
                  heldout: pa.Table) -> dict[str, Any]:
    """The trained scorer through the ``hf`` Scorer (as ``gleaner score`` runs it) on the
    held-out items, against the ranker's scores."""
    from gleaner.tasks.deita.score import HFScorer

    remote = model_path(store, run_id, layout.scorer_model_name(kind))
    items = heldout.to_pylist()
    with tempfile.TemporaryDirectory(prefix="gleaner-scorer-") as scratch:
        folder = remote
        if not store.is_local:
            store.fs.get(remote.rstrip("/") + "/", scratch, recursive=True)
            folder = scratch
        scorer = HFScorer(folder, device=config.score.device,
                          batch_size=config.score.forward_batch_size,
                          max_length=config.score.max_length)
        scored = scorer.score([scorer_prompt(kind, i) for i in items])
    # the hf scorer loads a local folder: a model in an object store is copied down first
    where = remote if store.is_local else f"<a local copy of {store.uri(remote)}>"
    report = {"kind": kind, "model": store.uri(remote),
              **agreement([float(s.value) for s in scored], [i["score"] for i in items]),
              "use": f"gleaner score --run-id RUN --{kind}-model {where}"}
    store.write_json(posixpath.join(layout.finetune_dir(
        store, run_id, layout.scorer_model_name(kind)), "report.json"), report)
    return report


def run_scorer_train(store: Store, run_id: str, config: GleanerConfig, kind: str
                     ) -> dict[str, Any]:
    """Fine-tune the scorer on the run's EVOL items of ``kind``; report on held-out seeds."""
    items = read_items(store, run_id, kind)
    if items.num_rows == 0:
        raise ValueError(f"run {run_id!r} has no ok EVOL {kind} chains to train on")
    s = config.evol.scorer
    train_items, heldout = split_items(items, s.heldout_fraction, s.seed)
    summary = run_finetune(store, run_id, finetune_config(config),
                           training_records(kind, train_items.to_pylist()),
                           name=layout.scorer_model_name(kind))
    seeds = set(items.column("seed_id").to_pylist())
    saved = posixpath.join(layout.finetune_dir(store, run_id, layout.scorer_model_name(kind)),
                           "report.json")
    report = store.read_json(saved) if summary.get("reused") and store.exists(saved) else \
        scorer_report(store, run_id, config, kind, heldout)  # the same model: its report
    return {**summary, "kind": kind, "items": items.num_rows, "seeds": len(seeds),
            "train_items": train_items.num_rows, "report": report}


@task(name="scorer-model", retries=0)
def scorer_train_task(run_id: str, config: GleanerConfig, kind: str) -> dict[str, Any]:
    """One trained scorer as a task run (retries are Ray Train's, from checkpoints)."""
    return run_scorer_train(Store(config.store.url, config.store.options), run_id, config, kind)


def report_markdown(result: dict[str, Any]) -> str:
    r = result["report"]
    return "\n".join([
        f"# DEITA {result['kind']} scorer of run `{result['run_id']}`", "",
        "| items | seeds | trained on | held out | steps | final loss | Spearman | MAE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['items']} | {result['seeds']} | {result['train_items']} | "
        f"{r['heldout_items']} | {result['steps']} | {result['final_loss']} | "
        f"{r['spearman']} | {r['mae']} |", "", f"model: `{r['model']}`; use: `{r['use']}`",
    ])
