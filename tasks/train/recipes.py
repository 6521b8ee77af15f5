"""Fine-tuning recipes: the Alpaca and LIMA presets (SPEC §3, §5), optimizer and schedule.

A recipe is a flat dataclass so every field can be overridden from the config
(``finetune.overrides``) or the CLI. Presets state the papers' numbers:

- ``alpaca``: lr 2e-5, 3 epochs, effective batch 128, max length 512, cosine
  schedule with 3 % warm-up, bf16 on GPU; AdamW with the HF Trainer defaults
  Alpaca used (betas 0.9/0.999, no weight decay).
- ``lima``: AdamW betas 0.9/0.95, weight decay 0.1, lr 1e-5 decaying linearly to
  1e-6 with no warm-up, 15 epochs, 2048 tokens, an end-of-turn token between
  speakers, residual dropout rising linearly from 0.0 at the bottom layer to 0.3
  at the top. LIMA used batch 32 and dropout 0.3 for its 65B model and batch 64
  and dropout 0.2 "for smaller models"; here a model is "large" from
  ``large_model_params`` (60e9) parameters on, decided when the model is loaded.

- ``dpo`` (``gleaner dpo train``): Rafailov et al. 2023, App. B: lr 1e-6 with a linear
  warm-up (150 steps there; 10 % of the steps here), then constant, batch 64; one epoch;
  AdamW where the paper used RMSprop.
- ``reward`` (``gleaner reward train``): InstructGPT's reward-model settings (Ouyang et al.
  2022, App. C.2; GPT-4-LLM does not state its own): one epoch, lr 9e-6 on a cosine
  schedule, batch 64 pairs; Alpaca's template for the (prompt, response) text.

The recipe becomes the arguments of TRL's trainers in tasks/train/trainer_settings.py:
transformers' AdamW (weight decay skips biases and normalisation weights) and schedules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

PRESETS = ("alpaca", "lima", "reward", "dpo")


@dataclass(frozen=True)
class Recipe:
    preset: str = "alpaca"
    learning_rate: float = 2e-5
    final_learning_rate: float = 0.0  # where a linear schedule ends
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    effective_batch_size: int = 128  # per optimizer step, across all workers
    per_device_batch_size: int = 4  # micro-batch; gradient accumulation makes up the rest
    max_length: int = 512
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    bf16: bool = True  # only where a GPU supports it; CPU trains in fp32
    template: str = "alpaca"  # alpaca | chat | eot  (see tasks/sft_data.py)
    end_of_turn_token: str | None = None
    residual_dropout_top: float = 0.0  # dropout on the top layer's residual branches
    packing: bool = False
    gradient_checkpointing: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    seed: int = 42
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    # LIMA's size rule; None = keep the values above whatever the model's size.
    large_model_params: float | None = None
    small_model_effective_batch_size: int | None = None
    small_model_residual_dropout_top: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ALPACA = Recipe()

LIMA = Recipe(
    preset="lima",
    learning_rate=1e-5,
    final_learning_rate=1e-6,
    scheduler="linear",
    warmup_ratio=0.0,
    epochs=15.0,
    effective_batch_size=32,
    per_device_batch_size=2,
    max_length=2048,
    weight_decay=0.1,
    adam_beta1=0.9,
    adam_beta2=0.95,
    template="eot",
    end_of_turn_token="<|end_of_turn|>",
    residual_dropout_top=0.3,
    large_model_params=60e9,
    small_model_effective_batch_size=64,
    small_model_residual_dropout_top=0.2,
)


REWARD = Recipe(
    preset="reward",
    learning_rate=9e-6,
    epochs=1.0,
    effective_batch_size=64,
    per_device_batch_size=4,
    max_length=512,
)
DPO = Recipe(
    preset="dpo",
    learning_rate=1e-6,
    scheduler="constant",
    warmup_ratio=0.1,
    epochs=1.0,
    effective_batch_size=64,
    per_device_batch_size=4,
    max_length=512,
)
RECIPES = {"alpaca": ALPACA, "lima": LIMA, "reward": REWARD, "dpo": DPO}


def recipe_fields() -> set[str]:
    return {f.name for f in fields(Recipe)}


def build_recipe(preset: str, overrides: dict[str, Any] | None = None,
                 model_params: int | None = None) -> Recipe:
    """The preset, adjusted for the model's size (LIMA), then the user's overrides on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = RECIPES[preset]
    overrides = dict(overrides or {})
    unknown = set(overrides) - recipe_fields()
    if unknown:
        raise ValueError(
            f"unknown finetune override(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(recipe_fields()))}"
        )
    threshold = overrides.get("large_model_params", recipe.large_model_params)
    if threshold is not None and model_params is not None and model_params < threshold:
        small: dict[str, Any] = {}
        if recipe.small_model_effective_batch_size is not None:
            small["effective_batch_size"] = recipe.small_model_effective_batch_size
        if recipe.small_model_residual_dropout_top is not None:
            small["residual_dropout_top"] = recipe.small_model_residual_dropout_top
        recipe = replace(recipe, **small)
    return replace(recipe, **overrides)


def total_steps(recipe: Recipe, examples: int, world_size: int) -> int:
    """Optimizer steps as transformers counts them: the examples in micro-batches, the batches
    split over the ranks, then accumulated (rounded up per epoch), times the epochs."""
    micro_batches = math.ceil(math.ceil(examples / recipe.per_device_batch_size)
                              / max(1, world_size))
    accumulation = max(1, recipe.effective_batch_size
                       // (recipe.per_device_batch_size * max(1, world_size)))
    steps_per_epoch = max(1, math.ceil(micro_batches / accumulation))
    steps = max(1, math.ceil(recipe.epochs * steps_per_epoch))
    return min(steps, recipe.max_steps) if recipe.max_steps else steps
