"""Counting the prompt tokens of a request before it is sent.

Two counters, chosen per model (:func:`counter_for`):

- the model's own tokenizer, where one is at hand offline: ``budget.tokenizers``
  names one (an HF folder or a ``.gguf`` file) for a model, and the offline
  SmolLM2 default has its GGUF's. A chat request is rendered with the
  tokenizer's chat template, as the server renders it.
- otherwise characters / ``budget.chars_per_token`` (4.0: OpenAI's rule of thumb
  for English) plus the chat format's overhead per message (OpenAI's
  cookbook count: 3 tokens per message, 3 to prime the reply). When the store
  holds recorded usage of the same requests (the run's finished rows, the cache
  rows it reuses), :func:`calibrated` fits the characters per token to it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gleaner.config import BudgetConfig, EndpointConfig
from gleaner.engine.replay import CHAT_URL

log = logging.getLogger("gleaner.tasks.cost")
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class TokenCounter(Protocol):
    name: str  # says how the count was made, for the plan's reader

    def prompt_tokens(self, url: str, body: Mapping[str, Any]) -> int: ...


def request_chars(url: str, body: Mapping[str, Any]) -> int:
    """The characters of a request's text (messages' contents, or the raw prompt)."""
    if url == CHAT_URL:
        return sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, str) else sum(len(str(p)) for p in prompt)


def format_overhead(url: str, body: Mapping[str, Any]) -> int:
    """Tokens of the chat format around the messages (none for a raw prompt)."""
    if url != CHAT_URL:
        return 0
    return TOKENS_PER_MESSAGE * len(body.get("messages", [])) + TOKENS_PER_REPLY


@dataclass
class CharsPerToken:
    chars_per_token: float
    calibrated_on: int = 0  # requests of recorded usage the ratio was fitted to

    @property
    def name(self) -> str:
        how = (f"calibrated on {self.calibrated_on:,} recorded requests" if self.calibrated_on
               else "default")
        return f"{self.chars_per_token:.2f} chars/token ({how})"

    def prompt_tokens(self, url: str, body: Mapping[str, Any]) -> int:
        return round(request_chars(url, body) / self.chars_per_token) + format_overhead(url, body)


class TokenizerCounter:
    """Exact counts with the model's tokenizer (chat requests through its chat template)."""

    def __init__(self, tokenizer: Any, source: str):
        self.tokenizer = tokenizer
        self.name = f"tokenizer {source}"

    def prompt_tokens(self, url: str, body: Mapping[str, Any]) -> int:
        tok = self.tokenizer
        if url == CHAT_URL:
            messages = [dict(m) for m in body.get("messages", [])]
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
                return len(tok.encode(text, add_special_tokens=False))
            return sum(len(tok.encode(str(m.get("content") or ""), add_special_tokens=False))
                       for m in messages) + format_overhead(url, body)
        return len(tok.encode(str(body.get("prompt", "")), add_special_tokens=True))


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    """A tokenizer from an HF folder/id or a ``.gguf`` file (no download: offline).

    Reading a tokenizer out of a GGUF parses the whole file (tens of seconds on a busy
    CPU), so the first load saves it as a plain folder in ``$GLEANER_HOME/tokenizers``.
    """
    from transformers import AutoTokenizer

    from gleaner.runtime import STATE_DIR
    from gleaner.tasks.train.finetune import load_tokenizer as load

    if not source.endswith(".gguf"):
        return load(source)
    path = Path(source)
    stat = path.stat()
    folder = STATE_DIR / "tokenizers" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = load(source)
    try:
        tokenizer.save_pretrained(str(folder))
    except OSError as error:  # a read-only home: count with it all the same
        log.info("cannot keep the tokenizer in %s: %s", folder, error)
    return tokenizer


def tokenizer_source(endpoint: EndpointConfig, budget: BudgetConfig) -> str | None:
    """Where the model's tokenizer is, if anywhere here: configured, or the offline GGUF."""
    if endpoint.model in budget.tokenizers:
        return budget.tokenizers[endpoint.model]
    if endpoint.base_url is None or endpoint.local_server:
        from gleaner.models import smollm2_gguf

        try:
            return str(smollm2_gguf())
        except Exception as error:  # the local-llm extra is not installed
            log.info("no offline tokenizer (%s): counting characters", error)
    return None


def counter_for(endpoint: EndpointConfig, budget: BudgetConfig,
                calibration: CharsPerToken | None = None) -> TokenCounter:
    source = tokenizer_source(endpoint, budget)
    if source is not None:
        try:
            return TokenizerCounter(load_tokenizer(source), Path(source).name)
        except Exception as error:  # no such tokenizer offline: say so and count characters
            log.warning("cannot load the tokenizer %s (%s): counting characters", source, error)
    return calibration or CharsPerToken(budget.chars_per_token)


def calibrated(budget: BudgetConfig, requests: Sequence[tuple[str, Mapping[str, Any]]],
               recorded_prompt_tokens: int) -> CharsPerToken:
    """Characters per token fitted to recorded usage: the recorded prompt tokens of exactly
    these requests (their format overhead taken out first)."""
    chars = sum(request_chars(url, body) for url, body in requests)
    text_tokens = recorded_prompt_tokens - sum(format_overhead(url, body)
                                               for url, body in requests)
    if not requests or chars <= 0 or text_tokens <= 0:
        return CharsPerToken(budget.chars_per_token)
    return CharsPerToken(chars / text_tokens, calibrated_on=len(requests))
