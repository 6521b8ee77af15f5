"""What the Ray Train loop (tasks/train/finetune.py) optimises: one objective per kind of model.

The loop owns what every objective shares: shards, gradient accumulation, clipping, the
schedule, bf16 autocast on GPU, checkpoints to the store and resume to the micro-batch. An
objective says only how its model is built, how a micro-batch is made, what its loss is and
what it reports on held-out rows at the end:

- :class:`CausalLM` (supervised fine-tuning, the default): transformers' own next-token
  cross-entropy over the response tokens (labels are -100 elsewhere);
- ``gleaner.tasks.reward.objective.PairwiseReward``: a sequence-classification head with one
  scalar, trained on (chosen, rejected) pairs with -log sigmoid(r(x, y_h) - r(x, y_l)).

Objectives are pickled to the workers: settings only, never a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa


class Objective(Protocol):
    name: str

    def load_model(self, source: str) -> Any:
        """The model to train, from a base model or a checkpoint's model folder (fp32)."""

    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        """The training rows of the table the driver tokenised."""

    def collate(self, rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        """One micro-batch of tensors (with an ``attention_mask``: the loop counts tokens)."""

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """The micro-batch's mean loss (a scalar tensor)."""

    def evaluate(self, model: Any, table: pa.Table | None, pad_token_id: int,
                 device: Any) -> dict[str, Any]:
        """Metrics on held-out rows after the last step (on rank 0); {} when none."""


@dataclass(frozen=True)
class CausalLM:
    """Supervised fine-tuning of a causal LM on response tokens."""

    name: str = "sft"

    def load_model(self, source: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        return [{"input_ids": i, "labels": lab} for i, lab in
                zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(),
                    strict=True)]

    def collate(self, rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        from gleaner.tasks.train.sft_data import collate

        return collate(rows, pad_token_id)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(**batch).loss

    def evaluate(self, model: Any, table: pa.Table | None, pad_token_id: int,
                 device: Any) -> dict[str, Any]:
        return {}
