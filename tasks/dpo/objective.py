"""Direct Preference Optimization (Rafailov et al. 2023) on the shared Ray Train runner.

The policy starts from the run's SFT model (or a named base) and trains on TRL's
``DPOTrainer`` with the sigmoid loss −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) −
(log π(y_l|x) − log π_ref(y_l|x))]); the reference is a frozen copy of the starting model
(TRL loads it from the same folder; under LoRA it is the base with the adapters disabled).
Rows are preference rows (tasks/compare/preferences.py): ``prompt``, ``chosen``, ``rejected``
texts in the policy's format, each response already closed; TRL tokenises them and cuts a
pair over ``max_length`` at its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gleaner.tasks.train.objectives import CausalLM
from gleaner.tasks.train.recipes import Recipe


@dataclass(frozen=True)
class DirectPreference(CausalLM):
    """Train a policy (a causal LM, loaded as for fine-tuning) to prefer the chosen response
    over the rejected one, staying near where it started."""

    name: str = "dpo"
    beta: float = 0.1

    def trainer(self, model: Any, arguments: dict[str, Any], table: pa.Table, tokenizer: Any,
                peft_config: Any, recipe: Recipe) -> Any:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        rows = Dataset.from_dict({k: table.column(k).to_pylist()
                                  for k in ("prompt", "chosen", "rejected")})
        args = DPOConfig(**arguments, beta=self.beta, loss_type=["sigmoid"],
                         dataset_num_proc=None)
        return DPOTrainer(model=model, args=args, train_dataset=rows,
                          processing_class=tokenizer, peft_config=peft_config)

