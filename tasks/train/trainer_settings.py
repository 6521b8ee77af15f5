"""A recipe and a layout turned into the arguments of TRL's trainers (transformers' Trainer).

The recipe (tasks/train/recipes.py) states the papers' hyper-parameters; the layout (the
``strategy``, ``peft``, ``lora`` and ``attn_implementation`` settings of a trainer section)
says how the run is spread over devices. Every trainer gleaner runs (supervised fine-tuning,
the reward model, the DEITA scorers) gets its arguments here, so a setting means the same
thing for all of them:

- ``ddp``: transformers' own data parallelism (every rank holds the whole model);
- ``fsdp``: FSDP2, full shard, one unit per decoder layer, bf16 mixed precision on GPU,
  sharded checkpoints; activation checkpointing through FSDP when the recipe asks for it;
- ``deepspeed``: ZeRO-3 from ``deepspeed_zero3.json`` beside this file ("auto" values filled
  by transformers from these arguments);
- ``peft``: PEFT's LoRA adapters (``qlora``: on a 4-bit NF4 base through bitsandbytes).

``check_runnable`` refuses, naming the setting, what the installed packages or the hardware
cannot run, before any worker starts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gleaner.tasks.train.recipes import Recipe

DEEPSPEED_CONFIG = Path(__file__).with_name("deepspeed_zero3.json")


@dataclass(frozen=True)
class RunLayout:
    """How one training run is laid out; plain values, pickled to the Ray Train workers."""

    strategy: str = "ddp"
    peft: str = "none"
    attn_implementation: str = "sdpa"
    use_gpu: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ()
    lora_merge: bool = True

    @classmethod
    def of(cls, section: Any) -> RunLayout:
        """The layout a trainer section (``finetune``, ``reward.train``) asks for."""
        lora = section.lora
        return cls(strategy=section.strategy, peft=section.peft,
                   attn_implementation=section.attn_implementation, use_gpu=section.use_gpu,
                   lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   lora_target_modules=tuple(lora.target_modules), lora_merge=lora.merge)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the learning-rate schedules, by the recipe's name --------------------------------------
def _linear(recipe: Recipe) -> dict[str, Any]:
    # transformers' polynomial decay with power 1: a straight line to final_learning_rate
    return {"lr_end": recipe.final_learning_rate, "power": 1.0}


SCHEDULES: dict[str, tuple[str, Any]] = {
    "cosine": ("cosine", None),
    "linear": ("polynomial", _linear),
    "constant": ("constant_with_warmup", None),
}


def bf16_supported() -> bool:
    """bf16 mixed precision needs a GPU that has it (Ampere on; not a T4 or V100)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def frozen_base_dtype(layout: RunLayout) -> Any:
    """LoRA's frozen base in bf16 on a GPU that has it (what the memory plan counts), else
    fp32; QLoRA's base is 4-bit whatever this says."""
    import torch

    if layout.peft != "none" and layout.use_gpu and bf16_supported():
        return torch.bfloat16
    return torch.float32


def accumulation_steps(recipe: Recipe, world_size: int) -> int:
    """Micro-batches per optimizer step; the effective batch must come out exactly."""
    per_step = recipe.per_device_batch_size * max(1, world_size)
    steps, left = divmod(recipe.effective_batch_size, per_step)
    if left or not steps:
        raise ValueError(
            f"effective batch {recipe.effective_batch_size} is not a multiple of micro-batch "
            f"{recipe.per_device_batch_size} x {world_size} workers")
    return steps


def training_arguments(recipe: Recipe, layout: RunLayout, *, output_dir: str,
                       world_size: int, layer_class: str | None) -> dict[str, Any]:
    """Keyword arguments shared by TRL's configs (``SFTConfig``, ``RewardConfig``, ...)."""
    if recipe.scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {recipe.scheduler!r}; choose one of "
                         f"{', '.join(SCHEDULES)}")
    schedule, schedule_kwargs = SCHEDULES[recipe.scheduler]
    sharded_checkpointing = layout.strategy == "fsdp" and recipe.gradient_checkpointing
    arguments: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": recipe.per_device_batch_size,
        "gradient_accumulation_steps": accumulation_steps(recipe, world_size),
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,  # never on biases and norms (transformers' rule)
        "adam_beta1": recipe.adam_beta1,
        "adam_beta2": recipe.adam_beta2,
        "adam_epsilon": recipe.adam_epsilon,
        "optim": "adamw_torch",
        "max_grad_norm": recipe.max_grad_norm,
        "num_train_epochs": recipe.epochs,
        "max_steps": recipe.max_steps or -1,
        "lr_scheduler_type": schedule,
        "lr_scheduler_kwargs": schedule_kwargs(recipe) if schedule_kwargs else {},
        "warmup_steps": recipe.warmup_ratio,  # below 1: a share of the steps
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": recipe.checkpoint_every_steps,
        "save_total_limit": 1,  # locally; Ray Train keeps recipe.keep_checkpoints in the store
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not layout.use_gpu,
        "bf16": recipe.bf16 and layout.use_gpu and bf16_supported(),
        "activation_checkpointing": recipe.gradient_checkpointing and not sharded_checkpointing,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        "max_length": recipe.max_length,
    }
    if not layout.use_gpu and world_size > 1:
        arguments["ddp_backend"] = "gloo"
    if layout.strategy == "fsdp":
        arguments["fsdp"] = "full_shard auto_wrap"
        arguments["fsdp_config"] = {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": [layer_class] if layer_class else [],
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,
            "activation_checkpointing": sharded_checkpointing,
        }
    elif layout.strategy == "deepspeed":
        arguments["deepspeed"] = str(DEEPSPEED_CONFIG)
    return arguments


def lora_config(layout: RunLayout, task_type: str) -> Any | None:
    """PEFT's LoRA configuration, or None for a full fine-tune."""
    if layout.peft == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(r=layout.lora_rank, lora_alpha=layout.lora_alpha,
                      lora_dropout=layout.lora_dropout, task_type=task_type,
                      target_modules=list(layout.lora_target_modules) or "all-linear")


def quantization_config(layout: RunLayout) -> Any | None:
    """QLoRA's base: 4-bit NF4 with double quantisation, computing in bf16."""
    if layout.peft != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# ---- what cannot run here, said before any worker starts ------------------------------------
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_runnable(layout: RunLayout, key: str, module_names: set[str] | None = None) -> None:
    """Refuse, naming the setting, a layout the installed packages or devices cannot run.

    ``module_names``: the base model's sub-module names (from its config on the meta device),
    to check LoRA's target modules against.
    """
    if layout.strategy == "deepspeed" and not _installed("deepspeed"):
        raise ValueError(f"{key}.strategy 'deepspeed': DeepSpeed is not installed "
                         "(pip install 'gleaner[gpu]')")
    if layout.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        raise ValueError(f"{key}.attn_implementation 'flash_attention_2': flash-attn is not "
                         "installed (pip install 'gleaner[gpu]')")
    if layout.peft == "qlora":
        if not _installed("bitsandbytes"):
            raise ValueError(f"{key}.peft 'qlora': bitsandbytes is not installed "
                             "(pip install 'gleaner[gpu]')")
        if not layout.use_gpu:
            raise ValueError(f"{key}.peft 'qlora' needs GPUs ({key}.use_gpu: true): "
                             "bitsandbytes' 4-bit layers run on CUDA")
    if layout.peft != "none" and not layout.lora_merge:
        raise ValueError(
            f"{key}.lora.merge false: a model of adapters alone cannot yet be evaluated, scored "
            "or published by gleaner; keep merge true (the adapters are saved in model/adapter/ "
            "beside the merged model)")
    if layout.peft != "none" and layout.lora_target_modules and module_names is not None:
        leaves = {name.rsplit(".", 1)[-1] for name in module_names}
        missing = sorted(set(layout.lora_target_modules) - leaves)
        if missing:
            raise ValueError(
                f"{key}.lora.target_modules: the model has no module named "
                f"{', '.join(missing)}; its linear layers include "
                f"{', '.join(sorted(leaves)[:12])}")
