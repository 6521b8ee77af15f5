"""A trained reward model, loaded once, scoring (prompt, response) records in batches.

It reads what training left beside the weights: the rendering (``gleaner_sft.json``) and the
length texts were cut to (``gleaner_reward.json``), so a score is read from the same kind of
text the model learnt from (tasks/reward/data.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gleaner.devices import default_device, inference_dtype
from gleaner.tasks.reward.data import encode, with_response
from gleaner.tasks.reward.objective import pad_right, rewards
from gleaner.tasks.train.sft_data import FORMAT_FILE, SftFormat

REWARD_FILE = "gleaner_reward.json"  # how texts were cut when the model was trained


class RewardScorer:
    """r(x, y) for records with instruction, input, output (and conversation)."""

    def __init__(self, folder: str | Path, device: str | None = None, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no reward model in {folder} (config.json missing)")
        self.device = default_device(device)
        self.batch_size = max(1, batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        fmt_file, info_file = folder / FORMAT_FILE, folder / REWARD_FILE
        self.format = SftFormat.from_json(fmt_file.read_text()) if fmt_file.exists() \
            else SftFormat()
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        self.max_length = int(info.get("max_length") or 512)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=inference_dtype(self.device))
        if model.config.num_labels != 1:
            raise ValueError(f"{folder} is not a reward model: its head has "
                             f"{model.config.num_labels} outputs, not 1")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()

    def score(self, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[bool]]:
        """One reward per record (its own ``output`` as the response) and whether it was cut."""
        import torch

        encoded = [encode(with_response(r, r["output"]), self.tokenizer, self.format,
                          self.max_length) for r in records]
        out = np.empty(len(encoded), dtype=np.float64)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # little padding
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = pad_right([encoded[i][0] for i in chunk], self.tokenizer.pad_token_id)
            with torch.inference_mode():
                values = rewards(self.model, {k: v.to(self.device) for k, v in batch.items()})
            out[chunk] = values.cpu().numpy()
        return out, [cut for _, cut in encoded]
