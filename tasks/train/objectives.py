"""What a training run optimises: one objective per kind of model, each on its TRL trainer.

The runner (tasks/train/finetune.py, tasks/train/worker.py) owns what every objective shares:
Ray Train, the layout (DDP, FSDP, DeepSpeed, LoRA), checkpoints in the store and resume. An
objective says how its model is loaded, which TRL trainer trains it on the rows the driver
tokenised, and what it reports on held-out rows at the end:

- :class:`CausalLM` (supervised fine-tuning, the default): TRL's ``SFTTrainer`` on
  pre-tokenised rows whose labels are -100 outside the responses; packing is TRL's
  padding-free best-fit packing (position ids restart at each example);
- ``gleaner.tasks.reward.objective.PairwiseReward``: a sequence-classification head with one
  scalar on TRL's ``RewardTrainer``, -log sigmoid(r(x, y_h) - r(x, y_l)).

Objectives are pickled to the workers: settings only, never a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from gleaner.tasks.train.recipes import Recipe
from gleaner.tasks.train.trainer_settings import (
    RunLayout,
    frozen_base_dtype,
    quantization_config,
)


class Objective(Protocol):
    name: str
    peft_task: str  # PEFT's task type for LoRA adapters

    def load_model(self, source: str, layout: RunLayout, dtype: Any = None) -> Any:
        """The model to train (fp32 masters unless ``dtype``), or a trained one to publish."""

    def trainer(self, model: Any, arguments: dict[str, Any], table: pa.Table, tokenizer: Any,
                peft_config: Any, recipe: Recipe) -> Any:
        """The TRL trainer for ``model`` on the driver's tokenised ``table``."""

    def evaluate(self, model: Any, table: pa.Table | None, pad_token_id: int,
                 device: Any) -> dict[str, Any]:
        """Metrics on held-out rows of the published model (on rank 0); {} when none."""


def load_pretrained(auto_class: Any, source: str, layout: RunLayout, dtype: Any,
                    **kwargs: Any) -> Any:
    """A model in the layout's attention implementation: fp32 masters for full training, a
    bf16 frozen base under LoRA on a GPU, a 4-bit base under QLoRA (``dtype`` overrides)."""
    quantization = quantization_config(layout)
    return auto_class.from_pretrained(
        source, dtype=dtype or frozen_base_dtype(layout),
        attn_implementation=layout.attn_implementation,
        **({"quantization_config": quantization} if quantization else {}), **kwargs)


@dataclass(frozen=True)
class CausalLM:
    """Supervised fine-tuning of a causal LM on response tokens."""

    name: str = "sft"
    peft_task: str = "CAUSAL_LM"

    def load_model(self, source: str, layout: RunLayout, dtype: Any = None) -> Any:
        from transformers import AutoModelForCausalLM

        return load_pretrained(AutoModelForCausalLM, source, layout, dtype)

    def trainer(self, model: Any, arguments: dict[str, Any], table: pa.Table, tokenizer: Any,
                peft_config: Any, recipe: Recipe) -> Any:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = Dataset.from_dict({"input_ids": table.column("input_ids").to_pylist(),
                                  "labels": table.column("labels").to_pylist()})
        args = SFTConfig(**arguments, packing=recipe.packing, packing_strategy="bfd",
                         dataset_num_proc=None)
        return SFTTrainer(model=model, args=args, train_dataset=rows,
                          processing_class=tokenizer, peft_config=peft_config)

    def evaluate(self, model: Any, table: pa.Table | None, pad_token_id: int,
                 device: Any) -> dict[str, Any]:
        return {}
