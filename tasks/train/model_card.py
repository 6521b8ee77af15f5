"""The model card saved with every fine-tuned model: what it was trained from, on what, how.

A Hugging Face model card (``README.md`` with a YAML header) so that a model leaving the
store, for a hub or a colleague, still says its base model, its data, its recipe and how
training went.
"""

from __future__ import annotations

from typing import Any

import yaml


def model_card(*, name: str, run_id: str, base_model: str, recipe: dict[str, Any],
               metrics: dict[str, Any], layout: dict[str, Any],
               data: dict[str, Any] | None = None, dataset: str = "",
               trained_on: str | None = None) -> str:
    """The card's markdown: a fine-tune's ``data`` counts and ``dataset``, or ``trained_on``
    for models that learn from something else (comparison pairs)."""
    data = data or {}
    header = {"base_model": base_model, "library_name": "transformers",
              "tags": ["gleaner", f"preset-{recipe.get('preset')}", "instruction-tuning"]}
    final = metrics["history"][-1]["loss"] if metrics.get("history") else None
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {name} (gleaner run `{run_id}`)", "",
        trained_on or (
            f"Fine-tuned from `{base_model}` on {dataset}: {data.get('examples')} examples, "
            f"{data.get('sequences')} training sequences ({data.get('trimmed')} trimmed to "
            f"max_length, {data.get('dropped_no_response_tokens')} dropped with no response "
            "token left). Loss on response tokens only."), "",
        "## Recipe", "", "| setting | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in recipe.items() if value is not None],
        "", "## Training", "", "| | |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in {
            **layout, "steps": metrics.get("steps"), "final loss": final,
            "tokens": metrics.get("tokens"), "tokens/s": metrics.get("tokens_per_s"),
            "device": metrics.get("device"), "bf16": metrics.get("bf16"),
            "world size": metrics.get("world_size"),
            "peak GPU memory (bytes)": metrics.get("gpu_max_memory_bytes"),
            "resumed from step": metrics.get("resumed_from_step")}.items()
          if value is not None],
    ]
    return "\n".join(lines) + "\n"
