"""Training on Ray Train, driven from here: one way for one GPU, many GPUs, many nodes, or CPU.

``train()`` runs the worker loop (tasks/train/worker.py: TRL's trainer for the objective) on a
``TorchTrainer`` (``ScalingConfig(num_workers, use_gpu)``) and brings the published model and
the run's state back from the final checkpoint. Ray Train persists checkpoints to the run's
storage path (the store, through its fsspec filesystem); a rerun with the same storage path
and name restores the latest one (Ray Train V2's run-level restore).

What is optimised is an objective (tasks/train/objectives.py): supervised fine-tuning of a
causal LM by default, the pairwise reward-model loss for ``gleaner reward train``; the
runner, its checkpoints and its resume are the same for both.

LIMA's residual dropout is applied with forward hooks on each decoder layer's
attention and MLP sub-modules: their outputs are exactly the residual branches
added back to the stream, which is where "residual dropout" (Vaswani et al.)
acts. The rate rises linearly from 0 at the bottom layer to the recipe's top
rate. Architectures whose layers cannot be found get no dropout and say so.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from gleaner.tasks.train.objectives import Objective
from gleaner.tasks.train.recipes import Recipe
from gleaner.tasks.train.sft_data import SftFormat
from gleaner.tasks.train.trainer_settings import RunLayout

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "gleaner_run_state.json"
ADAPTER_DIR = "adapter"  # LoRA's adapters beside the merged model
HF_CHECKPOINT = "checkpoint"  # the trainer's own checkpoint inside a Ray Train one
BRANCH_NAMES = ("self_attn", "attn", "attention", "mlp", "feed_forward", "ffn")


# ---- base models ---------------------------------------------------------------------------
def load_tokenizer(source: str) -> Any:
    """Tokenizer of an HF id, a local folder or a ``.gguf`` file."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(source)


def dequantise_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Load a GGUF model with transformers (de-quantised to fp32) and save it as a plain HF folder.

    The quantizer record must go before ``save_pretrained``: the weights are
    no longer quantised, and a config claiming otherwise cannot be reloaded.
    """
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(str(gguf)).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def decoder_layers(model: Any) -> list[Any]:
    """The stack of decoder blocks, for the common causal-LM layouts (Llama-likes, GPT-2, NeoX)."""
    base = getattr(model, "module", model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = base
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if node is not None:
            return list(node)
    return []


def _drop_branch(module: Any, args: Any, output: Any, p: float) -> Any:
    import torch.nn.functional as F

    if not module.training or p <= 0:
        return None
    if isinstance(output, tuple):
        return (F.dropout(output[0], p=p, training=True), *output[1:])
    return F.dropout(output, p=p, training=True)


def add_residual_dropout(model: Any, top: float) -> list[float]:
    """Hook dropout onto every layer's residual branches; returns the per-layer rates."""
    if top <= 0:
        return []
    layers = decoder_layers(model)
    if not layers:
        log.warning("residual dropout: no decoder layers found in %s; none applied",
                    type(model).__name__)
        return []
    count = len(layers)
    rates = [top * index / (count - 1) if count > 1 else top for index in range(count)]
    for layer, rate in zip(layers, rates, strict=True):
        branches = [getattr(layer, n) for n in BRANCH_NAMES if hasattr(layer, n)]
        if not branches:
            log.warning("residual dropout: %s has no attention/MLP sub-module",
                        type(layer).__name__)
        for branch in branches:
            branch.register_forward_hook(partial(_drop_branch, p=rate))
    return rates


# ---- data on the workers -------------------------------------------------------------------
def sequences_table(sequences: list[Any]) -> pa.Table:
    return pa.table({
        "input_ids": pa.array([s.input_ids for s in sequences], pa.list_(pa.int32())),
        "labels": pa.array([s.labels for s in sequences], pa.list_(pa.int32())),
    })


# ---- the driver ----------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    checkpoint_dir: Path  # a local copy of the final checkpoint (model/ inside)
    state: dict[str, Any]
    wall_seconds: float
    storage: str
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.checkpoint_dir / MODEL_DIR


def train(*, sequences: pa.Table, tokenizer: Any, fmt: SftFormat, base_model: str, recipe: Recipe,
          layout: RunLayout, num_workers: int, storage_path: str,
          storage_filesystem: Any | None, run_name: str, local_dir: str | Path,
          cpus_per_worker: float | None = None, max_failures: int = 0,
          objective: Objective | None = None, heldout: pa.Table | None = None) -> TrainOutcome:
    """Fit on Ray Train and bring the final checkpoint to ``local_dir``.

    ``objective`` (default: SFT of a causal LM) says what is optimised; ``heldout`` rows are
    evaluated by it on the published model (``state["eval"]``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from gleaner.tasks.train.worker import train_loop_per_worker

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.as_dict(),
            "layout": layout.as_dict(),
            "format": {"template": fmt.template, "end_of_turn_token": fmt.end_of_turn_token},
            "tokenizer": tokenizer,
            "base_model": base_model,
            "data": ray.put(sequences),
            "objective": objective,
            "heldout": ray.put(heldout) if heldout is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=layout.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # print reaches the log as is: Ray Train's print patch would also log what
            # libraries print into a captured stream (dill's disassembly of every function
            # datasets fingerprints while TRL prepares the data)
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"fine-tuning failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    local_dir = Path(local_dir)
    shutil.rmtree(local_dir, ignore_errors=True)
    fetch_final(result.checkpoint, local_dir)
    state = json.loads((local_dir / STATE_FILE).read_text())
    return TrainOutcome(local_dir, state, wall, result.path, dict(result.metrics or {}))


def fetch_final(checkpoint: Any, local_dir: Path) -> None:
    """Bring the published model and the run's state of a checkpoint here, not the trainer's
    checkpoint beside them (its optimizer state only matters for resuming)."""
    import pyarrow.fs as pafs

    (local_dir / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    source = checkpoint.path.rstrip("/")
    pafs.copy_files(f"{source}/{MODEL_DIR}", str(local_dir / MODEL_DIR),
                    source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    with checkpoint.filesystem.open_input_stream(f"{source}/{STATE_FILE}") as handle:
        (local_dir / STATE_FILE).write_bytes(handle.read())


def count_parameters(source: str) -> int | None:
    """Parameter count from a model's config alone (no weights loaded), for LIMA's size rule;
    tied embeddings count once, as the memory plan counts them."""
    from gleaner.tasks.train.memory_plan import model_shape

    try:
        return model_shape(source).parameters
    except (OSError, ValueError, ImportError) as error:
        log.warning("cannot count the parameters of %s (%s); LIMA's size rule not applied",
                    source, error)
        return None
