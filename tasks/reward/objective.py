"""The reward model's objective on the shared Ray Train runner (tasks/train/objectives.py).

Model: transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1`` (what TRL's
RewardTrainer builds too): r(x, y) is the head's scalar at the last non-padding token.
Training is TRL's ``RewardTrainer`` on the pre-tokenised pairs (``chosen_ids``,
``rejected_ids``): loss -log sigmoid(r(x, y_h) - r(x, y_l)), the mean over the micro-batch.
The held-out report computes the same loss with :func:`pairwise_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gleaner.tasks.train.objectives import load_pretrained
from gleaner.tasks.train.recipes import Recipe
from gleaner.tasks.train.trainer_settings import RunLayout


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Any]:
    """input_ids and attention_mask, right-padded (the head reads the last real token)."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def rewards(model: Any, batch: dict[str, Any]) -> Any:
    """One scalar per row, in float32 (bf16 autocast would round the loss otherwise)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.squeeze(-1).float()


def pairwise_loss(chosen: Any, rejected: Any) -> Any:
    """-log sigmoid(r_h - r_l), the mean over pairs (GPT-4-LLM; InstructGPT's RM loss)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected).mean()


@dataclass(frozen=True)
class PairwiseReward:
    """Train r so that chosen responses score above rejected ones."""

    name: str = "reward"
    peft_task: str = "SEQ_CLS"
    eval_batch_size: int = 16

    def load_model(self, source: str, layout: RunLayout, dtype: Any = None) -> Any:
        from transformers import AutoModelForSequenceClassification

        return load_pretrained(AutoModelForSequenceClassification, source, layout, dtype,
                               num_labels=1)

    def trainer(self, model: Any, arguments: dict[str, Any], table: pa.Table, tokenizer: Any,
                peft_config: Any, recipe: Recipe) -> Any:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        pairs = Dataset.from_dict({"chosen_ids": table.column("chosen_ids").to_pylist(),
                                   "rejected_ids": table.column("rejected_ids").to_pylist()})
        args = RewardConfig(**arguments, center_rewards_coefficient=None, dataset_num_proc=None)
        return RewardTrainer(model=model, args=args, train_dataset=pairs,
                             processing_class=tokenizer, peft_config=peft_config)

    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        return [{"chosen_ids": c, "rejected_ids": r} for c, r in
                zip(table.column("chosen_ids").to_pylist(),
                    table.column("rejected_ids").to_pylist(), strict=True)]

    def collate(self, rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        return pad_right([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                         pad_token_id)

    def evaluate(self, model: Any, table: pa.Table | None, pad_token_id: int,
                 device: Any) -> dict[str, Any]:
        """Pairwise accuracy (r_h > r_l; a tie counts as wrong), loss and margin, held out."""
        import torch

        if table is None or table.num_rows == 0:
            return {"heldout_pairs": 0, "heldout_accuracy": None}
        rows = self.rows(table)
        correct, loss_sum, margin_sum = 0, 0.0, 0.0
        with torch.inference_mode():
            for start in range(0, len(rows), self.eval_batch_size):
                chunk = rows[start:start + self.eval_batch_size]
                batch = {k: v.to(device) for k, v in self.collate(chunk, pad_token_id).items()}
                chosen, rejected = rewards(model, batch).chunk(2)
                correct += int((chosen > rejected).sum().item())
                loss_sum += float(pairwise_loss(chosen, rejected).item()) * len(chunk)
                margin_sum += float((chosen - rejected).sum().item())
        n = len(rows)
        return {"heldout_pairs": n, "heldout_accuracy": correct / n,
                "heldout_loss": loss_sum / n, "heldout_mean_margin": margin_sum / n}
