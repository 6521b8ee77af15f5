"""The Ray Train worker of every training run: TRL's trainer for the objective, under Ray Train.

Each worker builds the objective's model and TRL trainer (``SFTTrainer`` for supervised
fine-tuning, ``RewardTrainer`` for the reward model) with the arguments the recipe and the
layout give (tasks/train/trainer_settings.py), reports every trainer checkpoint to Ray Train
(which writes it to the run's storage: the store, ``s3://`` included; each rank uploads its own
shards) and, at the end, the published model beside the last checkpoint. A rerun with the same
storage path resumes from the newest checkpoint: transformers restores the weights, optimizer,
schedule and data position, and the loss curve goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import PrinterCallback

from gleaner.tasks.train.finetune import (
    ADAPTER_DIR,
    HF_CHECKPOINT,
    MODEL_DIR,
    STATE_FILE,
    add_residual_dropout,
    decoder_layers,
)
from gleaner.tasks.train.objectives import CausalLM, Objective
from gleaner.tasks.train.recipes import Recipe
from gleaner.tasks.train.sft_data import FORMAT_FILE, SftFormat
from gleaner.tasks.train.trainer_settings import RunLayout, lora_config, training_arguments


# ---- checkpoints ---------------------------------------------------------------------------
class ReportCheckpoints(RayTrainReportCallback):
    """Ray Train's report callback for transformers, with each checkpoint folder named by its
    step: every rank's files (a sharded checkpoint's shards) land in the same folder of the
    store, uploaded by the rank that wrote them. The last save is left to the final report,
    which adds the finished model beside it."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step < state.max_steps:
            report_checkpoint(args.output_dir, state.global_step, last_metrics(state))


def last_metrics(state: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for entry in state.log_history:
        metrics.update(entry)
    return metrics


def report_checkpoint(output_dir: str, step: int, metrics: dict[str, Any],
                      add: Callable[[Path], None] | None = None) -> None:
    """Report this rank's newest trainer checkpoint (and what ``add`` writes) to Ray Train."""
    import ray.train
    from transformers.trainer_utils import get_last_checkpoint

    with tempfile.TemporaryDirectory(prefix="gleaner-report-") as tmp:
        folder = Path(tmp)
        source = get_last_checkpoint(output_dir)
        if source is not None:
            shutil.copytree(source, folder / HF_CHECKPOINT)
        if add is not None:
            add(folder)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(folder.iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def resume_point(checkpoint_dir: str | None) -> tuple[str | None, int | None]:
    """The trainer checkpoint inside a Ray Train checkpoint, and the step it holds."""
    if checkpoint_dir is None:
        return None, None
    folder = Path(checkpoint_dir) / HF_CHECKPOINT
    state_file = folder / "trainer_state.json"
    if not state_file.exists():
        return None, None
    return str(folder), int(json.loads(state_file.read_text())["global_step"])


# ---- FSDP on CPU -----------------------------------------------------------------------------
def enable_fsdp_on_cpu() -> None:
    """Let accelerate run the FSDP2 plugin the trainer asks for on CPU processes (gloo).

    accelerate 1.15 turns a CPU process group into ``MULTI_CPU`` and only switches to FSDP
    for accelerator types (``accelerate/state.py``, ``AcceleratorState.__init__``), so on
    CPU the trainer's ``fsdp`` arguments silently train plain DDP. FSDP2's ``fully_shard``
    itself runs over gloo; this makes the state take the plugin it was given, and keeps it
    when later ``AcceleratorState()`` calls copy the shared partial state back. Called in a
    Ray Train worker of a CPU run with ``strategy: fsdp`` only (a GPU run needs nothing).
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    if getattr(original, "gleaner_cpu_fsdp", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if (plugin is not None and self.distributed_type == DistributedType.MULTI_CPU
                and getattr(self, "fsdp_plugin", None) is None):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            state.PartialState().distributed_type = DistributedType.FSDP

    init.gleaner_cpu_fsdp = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = init  # type: ignore[method-assign]


# ---- evidence of the layout ----------------------------------------------------------------
def local_parameter_count(model: Any) -> int:
    """Parameters this rank holds: a sharded parameter counts its local shard (FSDP2's
    DTensor, ZeRO-3's ``ds_tensor``)."""
    total = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):
            local = parameter.ds_tensor
        else:
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel()
    return total


def gather(value: Any, world: int) -> list[Any]:
    """One value from every rank, in rank order."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def run_state(trainer: Any, result: Any, resumed_from_step: int | None) -> dict[str, Any]:
    """The loss curve and counters of the trainer, in the shape the store keeps."""
    history, seen = [], 0
    tokens_at_resume = 0
    for entry in trainer.state.log_history:
        if "loss" not in entry:
            continue
        tokens = int(entry.get("num_input_tokens_seen", seen))
        if resumed_from_step is not None and entry["step"] <= resumed_from_step:
            tokens_at_resume = tokens
        history.append({"step": entry["step"], "epoch": entry.get("epoch"),
                        "loss": entry["loss"], "lr": entry.get("learning_rate"),
                        "tokens": tokens - seen})
        seen = tokens
    total_tokens = int(trainer.state.num_input_tokens_seen or seen)
    return {
        "step": trainer.state.global_step, "total_steps": trainer.state.max_steps,
        "history": history, "tokens": total_tokens,
        "tokens_this_run": total_tokens - tokens_at_resume,
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "resumed_from_step": resumed_from_step,
        "accumulation": trainer.args.gradient_accumulation_steps,
        "trainer_metrics": {k: v for k, v in last_metrics(trainer.state).items()
                            if isinstance(v, int | float)},
    }


def publish_model(trainer: Any, objective: Objective, layout: RunLayout, base_model: str,
                  tokenizer: Any, target: Path, rank: int, bf16: bool) -> None:
    """The finished model as the store keeps it: full weights gathered from the shards, bf16
    when trained in bf16; under LoRA the base with the adapters merged in and the adapters
    themselves in ``adapter/`` (or the adapters alone when ``lora.merge`` is off)."""
    import torch

    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    merge = layout.peft != "none" and layout.lora_merge
    saved = target.with_name(target.name + "-adapter") if merge else target
    trainer.save_model(str(saved))  # a collective under FSDP / ZeRO-3: every rank calls it
    if rank != 0:
        return
    dtype = torch.bfloat16 if bf16 else torch.float32
    if merge:
        from peft import PeftModel

        base = objective.load_model(base_model, RunLayout(), dtype=dtype)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))
        merged = PeftModel.from_pretrained(base, str(saved)).merge_and_unload()
        merged.config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(target, max_shard_size="5GB")
        shutil.move(saved, target / ADAPTER_DIR)
    elif layout.peft == "none" and bf16:  # fp32 masters published as bf16
        converted = target.with_name(target.name + "-bf16")
        objective.load_model(str(target), RunLayout(), dtype=dtype).save_pretrained(
            converted, max_shard_size="5GB")
        shutil.rmtree(target)
        converted.rename(target)


def quiet_libraries() -> None:
    """No progress bars from datasets' and transformers' preparation steps in the worker logs
    (they reach the user's console through Ray)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---- the loop ------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: TRL's trainer for the objective, with Ray Train's
    reporting, resumed from the run's latest checkpoint when there is one."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train.huggingface.transformers import prepare_trainer

    quiet_libraries()
    recipe = Recipe(**config["recipe"])
    layout = RunLayout(**config["layout"])
    objective: Objective = config.get("objective") or CausalLM()
    fmt = SftFormat(**config["format"])
    tokenizer = config["tokenizer"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    table: pa.Table = ray.get(config["data"])

    if layout.strategy == "fsdp" and not layout.use_gpu:
        enable_fsdp_on_cpu()
    with contextlib.ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()
        restored = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        resume_from, resumed_step = resume_point(restored)
        model = objective.load_model(config["base_model"], layout)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if recipe.packing and layout.attn_implementation != "flash_attention_2":
            # flash-attention reads the sequence boundaries TRL's collator passes
            check_packing_keeps_examples_apart(model, layout)
        rates = add_residual_dropout(model, recipe.residual_dropout_top)
        layers = decoder_layers(model)
        output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gleaner-train-"))
        arguments = training_arguments(recipe, layout, output_dir=output_dir, world_size=world,
                                       layer_class=type(layers[0]).__name__ if layers else None)
        trainer = objective.trainer(model, arguments, table, tokenizer,
                                    lora_config(layout, objective.peft_task), recipe)
        trainer.add_callback(ReportCheckpoints())
        trainer.remove_callback(PrinterCallback)  # the loss curve is in the run's metrics
        trainer = prepare_trainer(trainer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = trainer.train(resume_from_checkpoint=resume_from)

        state = run_state(trainer, result, resumed_step)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        bf16 = bool(trainer.args.bf16)
        state.update(
            world_size=world, residual_dropout_rates=rates, bf16=bf16, device=device.type,
            dtype="bf16" if bf16 else "fp32", strategy=layout.strategy, peft=layout.peft,
            rank_parameters=gather(local_parameter_count(trainer.model_wrapped), world),
            rank_gpu_max_memory_bytes=gather(peak, world), gpu_max_memory_bytes=peak)
        model_dir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gleaner-final-"))) / MODEL_DIR
        publish_model(trainer, objective, layout, config["base_model"], tokenizer, model_dir,
                      rank, bf16)

        def add_model(folder: Path) -> None:
            if rank != 0:
                return
            tokenizer.save_pretrained(model_dir)
            (model_dir / FORMAT_FILE).write_text(fmt.to_json())
            if config.get("heldout") is not None:  # held-out metrics of the published model
                trained = objective.load_model(str(model_dir), RunLayout()).to(device).eval()
                state["eval"] = objective.evaluate(trained, ray.get(config["heldout"]),
                                                   tokenizer.pad_token_id, device)
            shutil.copytree(model_dir, folder / MODEL_DIR)
            (folder / STATE_FILE).write_text(json.dumps(state))

        report_checkpoint(output_dir, state["step"],
                          {**last_metrics(trainer.state), "final": True}, add_model)


def check_packing_keeps_examples_apart(model: Any, layout: RunLayout) -> None:
    """Packing is only allowed where the attention keeps packed examples apart: two short
    sequences run packed (position ids restarting, no attention mask, as TRL's padding-free
    collator makes them) must give the logits they give alone."""
    import torch

    device = next(model.parameters()).device
    first, second = torch.arange(3, 9)[None], torch.arange(11, 16)[None]
    packed = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
    second = second.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=second).logits[0].float()
        together = model(input_ids=packed, position_ids=positions).logits[0, 6:].float()
    model.train(was_training)
    exact = next(model.parameters()).dtype == torch.float32
    if not torch.allclose(alone, together, atol=1e-4 if exact else 5e-2,
                          rtol=1e-3 if exact else 5e-2):
        raise ValueError(
            f"finetune.overrides.packing: {type(model).__name__} with attention "
            f"{layout.attn_implementation!r} lets packed examples attend to each other; "
            "set packing to false or use an attention implementation that reads position ids "
            "(flash_attention_2)")
