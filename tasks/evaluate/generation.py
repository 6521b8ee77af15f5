"""Test prompts in a model's own format, and answering them in order, shortest first.

A model fine-tuned by gleaner carries ``gleaner_sft.json`` (its prompt template);
any other model is asked through its chat template when it has one, else with the
Alpaca prompt. :class:`PromptRenderer` needs only the tokenizer, so the driver
renders every prompt and the Ray actors holding the model (answer_stage) get text.
:func:`answer_in_order` sorts prompts by length before a back end sees them (batches
of similar lengths pad little) and puts the answers back in the prompts' order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gleaner.config import GenerationConfig
from gleaner.tasks.evaluate.backends import GenerationBackend, ModelSpec, Sampling
from gleaner.tasks.evaluate.eval_sets import EvalPrompt
from gleaner.tasks.train.sft_data import (
    FORMAT_FILE,
    SftFormat,
    conversation_prompt,
    generation_prompt,
    stop_token_ids,
)


def model_format(model_dir: str, tokenizer: Any) -> SftFormat:
    marker = Path(model_dir) / FORMAT_FILE
    if marker.exists():
        return SftFormat.from_json(marker.read_text())
    return SftFormat("chat" if getattr(tokenizer, "chat_template", None) else "alpaca")


class PromptRenderer:
    """A model's prompt format and stop tokens, from its tokenizer alone (no weights)."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.format = model_format(model_dir, self.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer, self.format)

    def prompts(self, items: Sequence[EvalPrompt]) -> list[str]:
        return [generation_prompt(p.instruction, p.input, self.tokenizer, self.format)
                for p in items]

    def conversation_prompts(self, conversations: Sequence[Sequence[dict[str, str]]]
                             ) -> list[str]:
        """Prompts for each conversation's next assistant turn, in the model's format."""
        return [conversation_prompt(c, self.tokenizer, self.format) for c in conversations]

    def model_spec(self, served_name: str | None = None) -> ModelSpec:
        texts = tuple(self.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids)
        return ModelSpec(self.model_dir, served_name or self.model_dir, tuple(self.stop_ids),
                         tuple(t for t in texts if t))


def answer_in_order(prompts: Sequence[str], answer: Callable[[list[str]], list[str]]
                    ) -> list[str]:
    """``answer`` called on the prompts sorted by length; the answers in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = answer([prompts[i] for i in order])
    if len(answers) != len(order):
        raise RuntimeError(f"the back end returned {len(answers)} answers for "
                           f"{len(order)} prompts")
    out = [""] * len(prompts)
    for i, text in zip(order, answers, strict=True):
        out[i] = text
    return out


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    seed: int = 0

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature if self.do_sample else 0.0,
                        self.seed)


class Generator:
    """A renderer and a back end in this process: for the benchmark and tests that answer a
    few prompts with a model they just trained. Pipelines answer through answer_stage."""

    def __init__(self, model_dir: str, settings: GenerationSettings | None = None,
                 backend: str = "transformers", **backend_settings: Any):
        from gleaner.registry import registry

        self.settings = settings or GenerationSettings()
        self.renderer = PromptRenderer(model_dir)
        self.backend = backend
        self._backend_settings = backend_settings  # more evaluate.generation fields
        self._backend_class = registry("generation_backend").get(backend)
        self._loaded: GenerationBackend | None = None

    def answer(self, items: Sequence[EvalPrompt]) -> list[str]:
        return self.answer_prompts(self.renderer.prompts(items))

    def answer_prompts(self, texts: Sequence[str]) -> list[str]:
        """Answers to rendered prompts, in order."""
        if not texts:
            return []
        if self._loaded is None:
            self._loaded = self._backend_class(
                self.renderer.model_spec(),
                GenerationConfig(backend=self.backend, forward_batch_size=self.settings.batch_size,
                                 **self._backend_settings))
        backend, sampling = self._loaded, self.settings.sampling()
        return answer_in_order(texts, lambda sorted_texts: backend.generate(sorted_texts,
                                                                            sampling))
