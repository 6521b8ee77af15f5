"""What a fine-tune needs on each GPU, worked out from the model's ``config.json`` alone, before
any GPU is booked (docs/gpu.md states every formula and its source).

Per-GPU bytes are the sum of four parts:

- **weights, gradients, optimizer state** (Rajbhandari et al. 2020, ZeRO, §3.1: mixed precision
  with Adam holds 16 bytes a trained parameter; SPEC §11). On GPU with bf16 the trained
  parameters are fp32 masters (4) with fp32 gradients (4) and two fp32 Adam moments (8); the
  forward pass computes in bf16 under autocast. On CPU everything is fp32 and the numbers are
  the same per parameter, which is what the test checks against a real step. AdamW's ``step``
  counter adds 4 bytes per parameter tensor. ``ddp`` keeps all of it on every GPU, plus DDP's
  gradient buckets (another fp32 gradient's size, ``bucket_cap`` aside). ``fsdp`` (full shard)
  and ``deepspeed`` (ZeRO-3) divide all three by the world size, and gather one decoder layer's
  parameters at a time in bf16 (two layers with prefetch).
- **frozen weights** under PEFT: ``lora`` keeps the base in bf16 (2 bytes a parameter),
  ``qlora`` in 4-bit NF4 with double quantisation (Dettmers et al. 2023: 0.5 byte plus about
  0.127 bit a parameter of constants); only the adapters are trained (16 bytes each).
- **activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", §4.1): per layer and 16-bit activations, ``s·b·h·(34 + 5·a·s/h)``
  bytes; the ``5·a·s/h`` term (attention scores) is absent with a memory-efficient attention
  (sdpa, flash-attention), and the MLP's 19·s·b·h is written as ``2 + (8 if gated else 4)·i/h
  + 1`` so that a SwiGLU MLP (Llama) of any width is counted. Gradient checkpointing keeps
  only each layer's input (2·s·b·h) plus one layer's full activations during recomputation.
  The logits add ``10·b·s·V`` (bf16 logits, their fp32 copy for the loss, its gradient).
- **headroom**: ``finetune.gpu_memory_headroom`` (10 % by default) is kept free for the CUDA
  context, the allocator's fragmentation and communication buffers.

The effective batch must be exactly ``micro-batch × accumulation × world``; a recipe that
cannot hit it is refused, as is a plan that does not fit. Nothing here loads weights: the model
is built on PyTorch's meta device from its config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gleaner.tasks.train.recipes import Recipe, total_steps

GIB = 2**30
STRATEGIES = ("ddp", "fsdp", "deepspeed")
PEFT_METHODS = ("none", "lora", "qlora")
SHARDED = ("fsdp", "deepspeed")
ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 trained parameter
GRAD_BYTES = 4  # fp32 gradient
STEP_COUNTER_BYTES = 4  # AdamW's per-tensor ``step`` (a float32 scalar tensor)
BF16 = 2
NF4_BYTES = 0.5 + 0.127 / 8  # QLoRA: 4-bit weights + double-quantised constants
LOGIT_BYTES = 10  # bf16 logits + fp32 copy + fp32 gradient
CHECKPOINT_WEIGHT_BYTES = BF16  # the published model: bf16 safetensors


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, read from its config on the meta device."""

    parameters: int
    parameter_tensors: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    vocab_size: int
    gated_mlp: bool
    largest_layer_parameters: int
    linear_shapes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        """Adapter parameters: r·(in + out) for every linear module named in ``targets``."""
        return sum(rank * (fan_in + fan_out) for name in targets
                   for fan_in, fan_out in self.linear_shapes.get(name, []))


@dataclass(frozen=True)
class TrainingLayout:
    """How a fine-tune is laid out on GPUs: the settings the plan reads."""

    strategy: str = "ddp"
    peft: str = "none"
    world_size: int = 1
    gpu_memory_gb: float = 80.0
    headroom: float = 0.10
    lora_rank: int = 16
    lora_target_modules: tuple[str, ...] = ()
    attention: str = "sdpa"
    on_gpu: bool = True


@dataclass
class MemoryPlan:
    fits: bool
    per_gpu_bytes: int
    budget_bytes: int
    breakdown: dict[str, int]
    effective_batch: int
    micro_batch: int
    accumulation: int
    world_size: int
    steps: int
    examples: int
    parameters: int
    trained_parameters: int
    checkpoint_bytes: int
    published_model_bytes: int
    strategy: str
    peft: str
    on_gpu: bool
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear_shapes(model: Any) -> dict[str, list[tuple[int, int]]]:
    import torch

    shapes: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault(name.rsplit(".", 1)[-1], []).append(
                (module.in_features, module.out_features))
    return shapes


def model_shape(source: str) -> ModelShape:
    """The shape of an HF model folder or id (only ``config.json`` is read) or a ``.gguf``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gleaner.tasks.train.finetune import decoder_layers

    path = Path(source)
    try:
        if path.suffix == ".gguf":
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"finetune.base_model {source!r}: no readable config.json ({error})"
                         ) from error
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = list(model.parameters())
    layers = decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0)
                       or 4 * hidden)
    act = str(getattr(text, "hidden_act", "") or getattr(text, "activation_function", ""))
    gated = act in ("silu", "swiglu", "geglu") or any(
        "gate_proj" in name for name, _ in model.named_modules())
    return ModelShape(
        parameters=sum(p.numel() for p in parameters),
        parameter_tensors=len(parameters),
        hidden_size=hidden,
        intermediate_size=intermediate,
        layers=len(layers) or int(getattr(text, "num_hidden_layers", 0)),
        heads=int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0)),
        vocab_size=int(getattr(text, "vocab_size", 0)),
        gated_mlp=gated,
        largest_layer_parameters=max((sum(p.numel() for p in layer.parameters())
                                      for layer in layers), default=0),
        linear_shapes=_linear_shapes(model),
    )


def default_lora_targets(shape: ModelShape) -> tuple[str, ...]:
    """Every attention and MLP projection the model has (QLoRA's choice: all linear layers
    but the output head)."""
    return tuple(name for name in shape.linear_shapes if name not in ("lm_head", "score"))


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, attention: str,
                     checkpointing: bool) -> int:
    """Korthikanti et al. 2022, per layer, 16-bit activations (see the module docstring)."""
    s, b, h = seq_len, micro_batch, shape.hidden_size
    ratio = shape.intermediate_size / h if h else 4.0
    attention_part = 11 * s * b * h + (0 if attention in ("sdpa", "flash_attention_2")
                                       else 5 * shape.heads * s * s * b)
    mlp_part = s * b * h * (2 + (8 if shape.gated_mlp else 4) * ratio + 1)
    per_layer = attention_part + mlp_part + 4 * s * b * h  # + the two layer norms
    logits = LOGIT_BYTES * b * s * shape.vocab_size
    if checkpointing:
        return int(2 * s * b * h * shape.layers + per_layer + logits)
    return int(per_layer * shape.layers + logits)


def training_bytes(shape: ModelShape, layout: TrainingLayout) -> tuple[dict[str, int], int]:
    """Per-GPU weights, gradients and optimizer state, and the trained parameter count."""
    world = max(1, layout.world_size)
    shard = world if layout.strategy in SHARDED else 1
    if layout.peft == "none":
        trained, tensors = shape.parameters, shape.parameter_tensors
        frozen = 0
    else:
        targets = list(layout.lora_target_modules or default_lora_targets(shape))
        trained = shape.lora_parameters(layout.lora_rank, targets)
        tensors = 2 * sum(len(shape.linear_shapes.get(name, [])) for name in targets)
        frozen = frozen_bytes(shape, layout)
    weights = math.ceil(MASTER_BYTES * trained / shard)
    gradients = math.ceil(GRAD_BYTES * trained / shard)
    optimizer = math.ceil((ADAM_BYTES * trained + STEP_COUNTER_BYTES * tensors) / shard)
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
             "frozen_weights": math.ceil(frozen / shard)}
    if layout.strategy == "ddp" and world > 1:
        parts["ddp_buckets"] = GRAD_BYTES * trained
    if layout.strategy in SHARDED and layout.on_gpu:
        parts["gathered_layers"] = 2 * BF16 * shape.largest_layer_parameters
    return parts, trained


def frozen_bytes(shape: ModelShape, layout: TrainingLayout) -> int:
    """The base model PEFT leaves untouched: bf16 under LoRA; under QLoRA the linear layers
    (not the output head) in NF4 and the rest (embeddings, norms) in bf16; fp32 on CPU."""
    if not layout.on_gpu:
        return 4 * shape.parameters
    if layout.peft == "lora":
        return BF16 * shape.parameters
    quantised = sum(fan_in * fan_out for name, mats in shape.linear_shapes.items()
                    if name not in ("lm_head", "score") for fan_in, fan_out in mats)
    return math.ceil(quantised * NF4_BYTES + BF16 * (shape.parameters - quantised))


def plan_training(shape: ModelShape, recipe: Recipe, layout: TrainingLayout,
                  examples: int) -> MemoryPlan:
    """The per-GPU memory, batch arithmetic and steps of one fine-tune, with the reasons it
    would be refused (``fits`` is False when there is any)."""
    reasons: list[str] = []
    if layout.strategy not in STRATEGIES:
        reasons.append(f"finetune.strategy {layout.strategy!r}: choose {', '.join(STRATEGIES)}")
    if layout.peft not in PEFT_METHODS:
        reasons.append(f"finetune.peft {layout.peft!r}: choose {', '.join(PEFT_METHODS)}")
    world = max(1, layout.world_size)
    micro = recipe.per_device_batch_size
    per_step = micro * world
    accumulation = max(1, recipe.effective_batch_size // per_step)
    if recipe.effective_batch_size % per_step:
        reasons.append(
            f"effective batch {recipe.effective_batch_size} is not micro-batch {micro} × "
            f"world {world} × a whole number of accumulation steps (it would be "
            f"{math.ceil(recipe.effective_batch_size / per_step) * per_step}); set "
            f"finetune.overrides.per_device_batch_size or finetune.num_workers so that "
            f"{per_step} divides {recipe.effective_batch_size}")
    if layout.peft != "none":
        targets = layout.lora_target_modules or default_lora_targets(shape)
        missing = [t for t in targets if t not in shape.linear_shapes]
        if missing:
            reasons.append(f"finetune.lora.target_modules {', '.join(missing)}: the model has "
                           f"no such linear module (it has "
                           f"{', '.join(sorted(shape.linear_shapes))})")
    parts, trained = training_bytes(shape, layout)
    parts["activations"] = activation_bytes(shape, micro, recipe.max_length, layout.attention,
                                            recipe.gradient_checkpointing)
    per_gpu = sum(parts.values())
    budget = int(layout.gpu_memory_gb * GIB * (1 - layout.headroom))
    if layout.on_gpu and per_gpu > budget:
        reasons.append(
            f"needs {per_gpu / GIB:.1f} GiB per GPU ({_parts_text(parts)}), more than "
            f"{budget / GIB:.1f} GiB ({layout.gpu_memory_gb:g} GB less "
            f"{layout.headroom:.0%} headroom) with strategy {layout.strategy}, peft "
            f"{layout.peft}, {world} GPU(s)")
    steps = total_steps(recipe, examples, world)
    published = CHECKPOINT_WEIGHT_BYTES * (trained if layout.peft != "none" else
                                           shape.parameters)
    checkpoint = (MASTER_BYTES + ADAM_BYTES) * trained + published
    return MemoryPlan(
        fits=not reasons, per_gpu_bytes=per_gpu, budget_bytes=budget, breakdown=parts,
        effective_batch=micro * accumulation * world, micro_batch=micro,
        accumulation=accumulation, world_size=world, steps=steps,
        examples=examples, parameters=shape.parameters, trained_parameters=trained,
        checkpoint_bytes=checkpoint, published_model_bytes=published,
        strategy=layout.strategy, peft=layout.peft, on_gpu=layout.on_gpu, reasons=reasons)


def _parts_text(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts.items() if value)


def plan_text(plan: MemoryPlan, title: str = "fine-tune plan") -> str:
    lines = [f"{title}: {plan.parameters / 1e9:.2f}B parameters, {plan.trained_parameters:,} "
             f"trained; strategy {plan.strategy}, peft {plan.peft}, {plan.world_size} GPU(s)",
             f"  per GPU: {plan.per_gpu_bytes / GIB:.1f} GiB of "
             f"{plan.budget_bytes / GIB:.1f} GiB usable"]
    lines += [f"    {name:<16} {value / GIB:8.2f} GiB" for name, value in plan.breakdown.items()
              if value]
    lines += [f"  batch: micro {plan.micro_batch} × accumulation {plan.accumulation} × world "
              f"{plan.world_size} = {plan.effective_batch}",
              f"  steps: {plan.steps} for {plan.examples} examples",
              f"  checkpoint (resumable): {plan.checkpoint_bytes / GIB:.1f} GiB; published "
              f"model (bf16): {plan.published_model_bytes / GIB:.2f} GiB",
              "  fits: yes" if plan.fits else "  fits: NO"]
    if not plan.on_gpu:
        lines.insert(2, "  (on CPU: GPU memory is not checked)")
    lines += [f"  refused: {reason}" for reason in plan.reasons]
    return "\n".join(lines)



def layout_of(section: Any) -> TrainingLayout:
    """The layout a trainer section (``finetune``, ``reward.train``, ``evol.scorer``) asks for."""
    return TrainingLayout(
        strategy=section.strategy, peft=section.peft, world_size=section.num_workers,
        gpu_memory_gb=section.gpu_memory_gb, headroom=section.gpu_memory_headroom,
        lora_rank=section.lora.rank, lora_target_modules=tuple(section.lora.target_modules),
        attention=section.attn_implementation, on_gpu=section.use_gpu)


def plan_for_section(section: Any, base_model: str, examples: int,
                     shape: ModelShape | None = None) -> MemoryPlan:
    """The plan of one training run of a trainer section on ``base_model`` (a folder, an HF id
    or a ``.gguf``; ``shape`` when already read), with the recipe its preset and overrides
    build for that model's size."""
    from gleaner.tasks.train.recipes import build_recipe

    shape = shape or model_shape(base_model)
    recipe = build_recipe(section.preset, section.overrides, shape.parameters)
    return plan_training(shape, recipe, layout_of(section), examples)


class PlanRefused(ValueError):
    """A training run that cannot fit, or whose batch arithmetic does not add up."""

    def __init__(self, plan: MemoryPlan, what: str):
        self.plan = plan
        super().__init__(f"{what} refused before any worker starts: " + "; ".join(plan.reasons))


def check_plan(plan: MemoryPlan, what: str) -> MemoryPlan:
    if not plan.fits:
        raise PlanRefused(plan, what)
    return plan
