"""Answering test prompts with a model: batched, greedy by default, in the model's training format.

vLLM is used when it is installed and a GPU is present; otherwise transformers'
``generate`` with left padding. A model fine-tuned by gleaner carries
``gleaner_sft.json`` (its prompt template); any other model is asked through
its chat template when it has one, else with the Alpaca prompt.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gleaner.devices import default_device, inference_dtype
from gleaner.tasks.evaluate.eval_sets import EvalPrompt
from gleaner.tasks.train.sft_data import (
    FORMAT_FILE,
    SftFormat,
    conversation_prompt,
    generation_prompt,
    stop_token_ids,
)

log = logging.getLogger(__name__)


def model_format(model_dir: str, tokenizer: Any) -> SftFormat:
    marker = Path(model_dir) / FORMAT_FILE
    if marker.exists():
        return SftFormat.from_json(marker.read_text())
    return SftFormat("chat" if getattr(tokenizer, "chat_template", None) else "alpaca")


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    seed: int = 0


class Generator:
    """One loaded model answering prompts (construct once, call many times)."""

    def __init__(self, model_dir: str, settings: GenerationSettings | None = None,
                 prefer_vllm: bool = True):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.settings = settings or GenerationSettings()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.format = model_format(model_dir, self.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer, self.format)
        self.backend = "vllm" if prefer_vllm and vllm_usable() else "transformers"
        self._model: Any = None

    def prompts(self, items: Sequence[EvalPrompt]) -> list[str]:
        return [generation_prompt(p.instruction, p.input, self.tokenizer, self.format)
                for p in items]

    def _load(self) -> Any:
        if self._model is None:
            if self.backend == "vllm":
                from vllm import LLM

                self._model = LLM(model=self.model_dir, seed=self.settings.seed)
            else:
                from transformers import AutoModelForCausalLM

                device = default_device()
                model = AutoModelForCausalLM.from_pretrained(self.model_dir,
                                                             dtype=inference_dtype(device))
                self._model = model.to(device).eval()
        return self._model

    def conversation_prompts(self, conversations: Sequence[Sequence[dict[str, str]]]
                             ) -> list[str]:
        """Prompts for each conversation's next assistant turn, in the model's format."""
        return [conversation_prompt(c, self.tokenizer, self.format) for c in conversations]

    def answer(self, items: Sequence[EvalPrompt]) -> list[str]:
        return self.answer_prompts(self.prompts(items))

    def answer_prompts(self, texts: Sequence[str]) -> list[str]:
        """Answers to rendered prompts (``prompts`` / ``conversation_prompts``), in order."""
        texts = list(texts)
        if not texts:
            return []
        model = self._load()
        if self.backend == "vllm":
            return self._answer_vllm(model, texts)
        return self._answer_transformers(model, texts)

    def _answer_vllm(self, model: Any, texts: list[str]) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.settings.temperature if self.settings.do_sample else 0.0,
            max_tokens=self.settings.max_new_tokens, stop_token_ids=self.stop_ids,
            seed=self.settings.seed)
        return [out.outputs[0].text.strip() for out in model.generate(texts, params)]

    def _answer_transformers(self, model: Any, texts: list[str]) -> list[str]:
        import torch

        torch.manual_seed(self.settings.seed)
        answers: list[str] = []
        size = max(1, self.settings.batch_size)
        for start in range(0, len(texts), size):
            batch = self.tokenizer(texts[start:start + size], return_tensors="pt", padding=True,
                                   add_special_tokens=True).to(model.device)
            kwargs: dict[str, Any] = {"max_new_tokens": self.settings.max_new_tokens,
                                      "eos_token_id": self.stop_ids or None,
                                      "pad_token_id": self.tokenizer.pad_token_id,
                                      "do_sample": self.settings.do_sample}
            if self.settings.do_sample:
                kwargs["temperature"] = self.settings.temperature
            with torch.inference_mode():
                output = model.generate(**batch, **kwargs)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += [t.strip() for t in
                        self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers
