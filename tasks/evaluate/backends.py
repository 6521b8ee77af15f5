"""Generation back ends: how a loaded model turns rendered prompts into answers.

One registry (``generation_backend``), chosen by ``evaluate.generation.backend``:

- ``transformers``: batched ``generate`` with left padding (CPU, or a GPU per replica);
- ``vllm``: a vLLM engine (continuous batching, tensor parallelism over the GPUs its
  Ray actor holds);
- ``endpoint``: any OpenAI-compatible server already serving the model (``vllm serve``,
  llama.cpp, a provider), asked for raw-text completions through the LLM client.

A back end is built once per Ray actor (gleaner.tasks.evaluate.answer_stage) and gets the
prompts in the model's training format, already rendered on the driver, so every back
end answers exactly the same text. Answers come back in the order of the prompts.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gleaner.config import GenerationConfig
from gleaner.devices import default_device, inference_dtype, placement
from gleaner.registry import register

GREEDY_BELOW = 1e-4  # a temperature under this is greedy decoding (FastChat's floor)


@dataclass(frozen=True)
class Sampling:
    """How one prompt is answered: greedy when ``temperature`` is below GREEDY_BELOW."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class ModelSpec:
    """The model a back end answers with: a local folder (or hub id), the name a server knows
    it by, and the token ids / texts that end an answer in its format."""

    folder: str
    served_name: str
    stop_ids: tuple[int, ...] = ()
    stop_texts: tuple[str, ...] = ()


class GenerationBackend(Protocol):
    device: str | None  # where the weights are ("cuda:0 bfloat16"), None for a remote server

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str]: ...

    def close(self) -> None: ...


def torch_dtype(setting: str, device: str) -> Any:
    """``auto``: bf16 on a GPU that has it, fp16 on an older one, fp32 on the CPU."""
    import torch

    return inference_dtype(device) if setting == "auto" else getattr(torch, setting)


@register("generation_backend", "transformers")
class TransformersBackend:
    """transformers' ``generate`` in batches of ``batch_size`` (left padding)."""

    def __init__(self, model: ModelSpec, settings: GenerationConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_spec, self.settings = model, settings
        self.tokenizer = AutoTokenizer.from_pretrained(model.folder)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = default_device()
        loaded = AutoModelForCausalLM.from_pretrained(
            model.folder, dtype=torch_dtype(settings.dtype, device))
        self.model = loaded.to(device).eval()
        self.device = placement(self.model)

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str]:
        import torch

        torch.manual_seed(sampling.seed)
        answers: list[str] = []
        size = self.settings.forward_batch_size
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens,
                                  "eos_token_id": list(self.model_spec.stop_ids) or None,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "do_sample": not sampling.greedy}
        if not sampling.greedy:
            kwargs["temperature"] = sampling.temperature
        for start in range(0, len(prompts), size):
            batch = self.tokenizer(list(prompts[start:start + size]), return_tensors="pt",
                                   padding=True, add_special_tokens=True).to(self.model.device)
            with torch.inference_mode():
                output = self.model.generate(**batch, **kwargs)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += [t.strip() for t in
                        self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def close(self) -> None:
        del self.model
        _free_accelerator_memory()


def vllm_engine_arguments(model: ModelSpec, settings: GenerationConfig, device: str
                          ) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: the dtype explicit, tensor parallelism over the GPUs the
    actor holds (one process per GPU inside it), the context cap and memory share asked for."""
    tensor_parallel = settings.tensor_parallel_size or max(1, int(settings.gpus))
    arguments: dict[str, Any] = {
        "model": model.folder,
        "tokenizer": model.folder,
        "dtype": str(torch_dtype(settings.dtype, device)).removeprefix("torch."),
        "tensor_parallel_size": tensor_parallel,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "seed": 0,
    }
    if tensor_parallel > 1:
        arguments["distributed_executor_backend"] = "mp"  # the actor's GPUs, this node
    if settings.max_model_len:
        arguments["max_model_len"] = settings.max_model_len
    if settings.enforce_eager:
        arguments["enforce_eager"] = True
    return arguments


@register("generation_backend", "vllm")
class VllmBackend:
    """One vLLM engine per actor; its memory is freed when the actor's model is done."""

    def __init__(self, model: ModelSpec, settings: GenerationConfig):
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError(
                "evaluate.generation.backend 'vllm' needs vLLM where the answering actors run "
                f"(pip install vllm on the GPU nodes): {error}") from None
        self.model_spec = model
        device = default_device()
        self.engine = LLM(**vllm_engine_arguments(model, settings, device))
        self.device = f"{device} vllm"

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0 if sampling.greedy else sampling.temperature,
            max_tokens=sampling.max_new_tokens, seed=sampling.seed,
            stop_token_ids=list(self.model_spec.stop_ids) or None)
        outputs = self.engine.generate(list(prompts), params, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]

    def close(self) -> None:
        del self.engine
        _free_accelerator_memory()


@register("generation_backend", "endpoint")
class EndpointBackend:
    """Raw-text completions of the rendered prompts from a server that already holds the
    model; requests in flight bounded by ``evaluate.generation.endpoint``'s client."""

    device = None

    def __init__(self, model: ModelSpec, settings: GenerationConfig):
        assert settings.endpoint is not None  # GenerationConfig checks it
        self.endpoint = settings.endpoint.model_copy(update={"model": model.served_name})
        self.model_spec = model
        self.concurrency = max(1, settings.forward_batch_size)

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str]:
        import asyncio

        from gleaner.llm.client import LLMClient, run_on_worker_loop

        stop = list(self.model_spec.stop_texts) or None

        async def go() -> list[str]:
            async with LLMClient(self.endpoint, concurrency=self.concurrency) as client:
                done = await asyncio.gather(*(
                    client.complete(prompt, max_tokens=sampling.max_new_tokens,
                                    temperature=0.0 if sampling.greedy else sampling.temperature,
                                    stop=stop, seed=sampling.seed)
                    for prompt in prompts))
            return [completion.text.strip() for completion in done]

        return run_on_worker_loop(go())

    def close(self) -> None:
        return None


def _free_accelerator_memory() -> None:
    """Give the GPU memory back before the next model loads on this node."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
