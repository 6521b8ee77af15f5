"""Where a model runs and in which dtype: one rule for every stage that loads one.

A stage's ``device`` setting wins; otherwise CUDA when this process sees a GPU, else the CPU.
Weights load in an explicit dtype, never the checkpoint's whim: bf16 on a GPU that supports
it (half the memory of fp32, the precision the models were trained in), fp16 on an older GPU,
fp32 on the CPU (CPU matmuls in bf16 are slow on most CPUs and lose precision the tests
compare against).
"""

from __future__ import annotations

from typing import Any


def default_device(requested: str | None = None) -> str:
    """The device a stage's model runs on: ``requested``, else cuda when present, else cpu."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str) -> Any:
    """bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def placement(model: Any) -> str | None:
    """Where a loaded model's weights are and in which dtype ("cuda:0 bfloat16"), for the
    stage summary; None for a worker that holds no torch model."""
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is None:
        return None
    return f"{parameter.device} {str(parameter.dtype).removeprefix('torch.')}"
