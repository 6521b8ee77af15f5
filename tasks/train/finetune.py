"""Supervised fine-tuning on Ray Train: one loop for one GPU, several GPUs, several nodes, or CPU.

``train()`` runs :func:`train_loop_per_worker` on a ``TorchTrainer``
(``ScalingConfig(num_workers, use_gpu)``). Each worker takes its shard of the
tokenised examples, accumulates gradients up to the recipe's effective batch
and reports a checkpoint (model, tokenizer, optimizer, scheduler, position in
the epoch and the loss curve so far) every ``checkpoint_every_steps`` steps.
Ray Train persists checkpoints to the run's storage path (the store, through
its fsspec filesystem); a rerun with the same storage path and name restores
the latest one (Ray Train V2's run-level restore) and continues from the very
micro-batch it stopped at.

What is optimised is an objective (tasks/train/objectives.py): supervised fine-tuning of a
causal LM by default, the pairwise reward-model loss for ``gleaner reward train``; the loop,
its checkpoints and its resume are the same for both.

LIMA's residual dropout is applied with forward hooks on each decoder layer's
attention and MLP sub-modules: their outputs are exactly the residual branches
added back to the stream, which is where "residual dropout" (Vaswani et al.)
acts. The rate rises linearly from 0 at the bottom layer to the recipe's top
rate. Architectures whose layers cannot be found get no dropout and say so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from gleaner.tasks.train.objectives import CausalLM, Objective
from gleaner.tasks.train.recipes import (
    Recipe,
    build_optimizer,
    build_scheduler,
    gradient_accumulation,
    total_steps,
)
from gleaner.tasks.train.sft_data import FORMAT_FILE, SftFormat

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
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


def epoch_order(count: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This worker's examples for one epoch: a seeded shuffle, split evenly across workers.

    The list is padded by wrapping around (as DistributedSampler does) so every
    worker runs the same number of micro-batches and collective ops stay aligned.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    per_worker = math.ceil(count / world)
    order += order[: per_worker * world - count]
    return order[rank::world]


# ---- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(directory: Path, model: Any, tokenizer: Any, fmt: SftFormat,
                    optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    import torch

    unwrapped = getattr(model, "module", model)
    model_dir = directory / MODEL_DIR
    unwrapped.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / FORMAT_FILE).write_text(fmt.to_json())
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    (directory / STATE_FILE).write_text(json.dumps(state))


# ---- the loop ------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    recipe = Recipe(**config["recipe"])
    objective: Objective = config.get("objective") or CausalLM()
    fmt = SftFormat(**config["format"])
    tokenizer = config["tokenizer"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(recipe.seed)

    table: pa.Table = ray.get(config["data"])
    sequences = objective.rows(table)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "history": [],
                             "tokens": 0, "train_seconds": 0.0, "resumed_from_step": None}
    checkpoint = ray.train.get_checkpoint()
    restore_dir: str | None = None
    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            restore_dir = stack.enter_context(checkpoint.as_directory())
            state = json.loads((Path(restore_dir) / STATE_FILE).read_text())
            state["resumed_from_step"] = state["step"]
        source = str(Path(restore_dir) / MODEL_DIR) if restore_dir else config["base_model"]
        model = objective.load_model(source)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        rates = add_residual_dropout(model, recipe.residual_dropout_top)
        if recipe.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = ray.train.torch.prepare_model(model)
        optimizer = build_optimizer(model, recipe)

        micro = recipe.per_device_batch_size
        per_worker = math.ceil(len(sequences) / world)
        micro_per_epoch = math.ceil(per_worker / micro)
        accumulation = gradient_accumulation(recipe, world)
        steps = total_steps(recipe, micro_per_epoch, accumulation)
        scheduler = build_scheduler(optimizer, recipe, steps)
        if restore_dir:
            optimizer.load_state_dict(torch.load(Path(restore_dir) / "optimizer.pt",
                                                 map_location=device))
            scheduler.load_state_dict(torch.load(Path(restore_dir) / "scheduler.pt"))

    use_bf16 = recipe.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def report(final: bool) -> None:
        gpu_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        metrics = {"step": state["step"], "epoch": state["epoch"], "total_steps": steps,
                   "loss": state["history"][-1]["loss"] if state["history"] else None,
                   "tokens": state["tokens"], "train_seconds": state["train_seconds"],
                   "gpu_max_memory_bytes": gpu_bytes, "final": final}
        state["gpu_max_memory_bytes"] = gpu_bytes
        state.update(total_steps=steps, accumulation=accumulation, world_size=world,
                     residual_dropout_rates=rates, bf16=use_bf16, device=device.type)
        if final and rank == 0:  # held-out metrics of the final model (rank 0 alone)
            heldout = ray.get(config["heldout"]) if config.get("heldout") is not None else None
            model.eval()
            state["eval"] = objective.evaluate(getattr(model, "module", model), heldout,
                                               tokenizer.pad_token_id, device)
            model.train()
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), model, tokenizer, fmt, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    model.train()
    pad = tokenizer.pad_token_id
    window_loss, window_micro, window_tokens = 0.0, 0, 0
    started = time.perf_counter()
    while state["step"] < steps:
        order = epoch_order(len(sequences), state["epoch"], recipe.seed, rank, world)
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        for index in range(state["micro_in_epoch"], len(batches)):
            batch = objective.collate([sequences[i] for i in batches[index]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            boundary = (index + 1) % accumulation == 0 or index + 1 == len(batches)
            sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") \
                else model.no_sync()
            with sync:
                with autocast():
                    loss = objective.loss(model, batch) / accumulation
                loss.backward()  # outside autocast, as PyTorch's AMP recipe says
            window_loss += loss.item()
            window_micro += 1
            window_tokens += int(batch["attention_mask"].sum().item())
            if not boundary:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["micro_in_epoch"] = index + 1
            loss_value, tokens = window_loss * accumulation / window_micro, window_tokens
            if world > 1:  # the curve and the throughput of all workers, not rank 0's
                totals = torch.tensor([loss_value, tokens], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(totals)
                loss_value, tokens = totals[0].item() / world, int(totals[1].item())
            state["tokens"] += tokens
            now = time.perf_counter()
            state["train_seconds"] += now - started
            started = now
            state["history"].append({
                "step": state["step"], "epoch": state["epoch"] + (index + 1) / len(batches),
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0], "tokens": tokens,
            })
            window_loss, window_micro, window_tokens = 0.0, 0, 0
            done = state["step"] >= steps
            if done or state["step"] % recipe.checkpoint_every_steps == 0:
                report(final=done)
                started = time.perf_counter()  # checkpoint time is not training time
            if done:
                return
        state["epoch"] += 1
        state["micro_in_epoch"] = 0


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
          num_workers: int, use_gpu: bool, storage_path: str, storage_filesystem: Any | None,
          run_name: str, local_dir: str | Path, cpus_per_worker: float | None = None,
          max_failures: int = 0, objective: Objective | None = None,
          heldout: pa.Table | None = None) -> TrainOutcome:
    """Fit on Ray Train and bring the final checkpoint to ``local_dir``.

    ``objective`` (default: SFT of a causal LM) says what is optimised; ``heldout`` rows are
    evaluated by it after the last step (``state["eval"]``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.as_dict(),
            "format": {"template": fmt.template, "end_of_turn_token": fmt.end_of_turn_token},
            "tokenizer": tokenizer,
            "base_model": base_model,
            "data": ray.put(sequences),
            "objective": objective,
            "heldout": ray.put(heldout) if heldout is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
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
    """Bring the model and trainer state of a checkpoint here, not its optimizer state
    (Adam's moments are twice the model's size and only matter for resuming)."""
    import pyarrow.fs as pafs

    (local_dir / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    source = checkpoint.path.rstrip("/")
    pafs.copy_files(f"{source}/{MODEL_DIR}", str(local_dir / MODEL_DIR),
                    source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    with checkpoint.filesystem.open_input_stream(f"{source}/{STATE_FILE}") as handle:
        (local_dir / STATE_FILE).write_bytes(handle.read())


def count_parameters(source: str) -> int | None:
    """Parameter count from a model's config alone (no weights loaded), for LIMA's size rule."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, ImportError) as error:
        log.warning("cannot count the parameters of %s (%s); LIMA's size rule not applied",
                    source, error)
        return None

