"""Session fixtures for a real but tiny causal LM: SmolLM2's tokenizer (from the shipped GGUF)
on a 2-layer Llama built from a config. ``from tests.support.tiny_models import *`` in a test
module makes the fixtures (named smol_tokenizer_dir, tokenizer, tiny_model_dir) available."""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = [
    "build_tiny_model", "fixture_smol_tokenizer_dir", "fixture_tiny_model_dir", "fixture_tokenizer",
]


@pytest.fixture(scope="session", name="smol_tokenizer_dir")
def fixture_smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer read from the shipped GGUF once per session (takes seconds)."""
    from gleaner.models import smollm2_gguf
    from gleaner.tasks.train.finetune import load_tokenizer

    folder = tmp_path_factory.mktemp("smol-tokenizer")
    load_tokenizer(str(smollm2_gguf())).save_pretrained(folder)
    return folder


@pytest.fixture(name="tokenizer")
def fixture_tokenizer(smol_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="session", name="tiny_model_dir")
def fixture_tiny_model_dir(smol_tokenizer_dir: Path,
                           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary, built from a config: trains in seconds."""
    return build_tiny_model(smol_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"), seed=0)


def build_tiny_model(tokenizer_dir: Path, folder: Path, seed: int) -> Path:
    """A freshly initialised tiny Llama (different seeds give different models)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
