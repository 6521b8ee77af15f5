"""IFD (SPEC §9): the answer's loss with and without the question, under one causal LM.

For an example (Q, A): ``L(A | Q)`` is the mean token cross-entropy over the
answer tokens when the model reads the question first, ``L(A)`` the same over
the same answer tokens read alone, and ``IFD = L(A | Q) / L(A)``. IFD > 1 means
the question does not help the model produce the answer (Cherry LLM drops those).

What the model reads, per example (Cherry LLM's ``data_analysis.py``, ``cherry`` mode):

- with the question: the start token, the Alpaca prompt of the instruction and
  input (the template gleaner fine-tunes with, up to ``### Response:``), then
  the answer;
- alone: the start token, then the answer (Cherry's code scores the output text
  alone after LLaMA's BOS).

The start token is the tokenizer's BOS (its EOS where it has none: GPT-2 and
SmolLM2 use ``<|endoftext|>`` as both), so every answer token is predicted in
both readings. Prompt and answer are tokenized separately and concatenated, so
both readings score exactly the same answer tokens (Cherry finds the boundary
by re-tokenizing a prefix, which can shift it by a token). Over-long examples
keep the prompt and cut the answer at ``max_length`` (both readings score the
same cut answer, flagged ``truncated``). A multi-turn example is scored on its
final response, every earlier turn being part of the question.

Batches are right-padded: with a causal mask, padding after a row's last token
changes none of its logits, and padded positions carry no label.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gleaner.tasks.train.sft_data import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt

IGNORE = -100
# What the stage's rows depend on besides the model (part of the cache key).
PROMPT_VERSION = hashlib.sha256(
    f"{ALPACA_PROMPT_INPUT}\x00{ALPACA_PROMPT_NO_INPUT}\x00start-token;separate;final-turn"
    .encode()).hexdigest()[:12]


def question_prompt(example: Mapping[str, Any]) -> str:
    """The text read before the answer: the Alpaca prompt of the example's question.

    Single-turn: instruction and input. Multi-turn: every turn before the final
    response (``role: content`` lines), as the instruction.
    """
    turns = [t for t in (example.get("conversation") or [])
             if t["role"] != "system" or t["content"]]
    if len(turns) > 2:
        earlier = "\n\n".join(f"{t['role']}: {t['content']}" for t in turns[:-1])
        return alpaca_prompt(earlier)
    return alpaca_prompt(example.get("instruction") or "", example.get("input") or "")


@dataclass
class Encoded:
    """One example's two token sequences; ``answer`` is the position where the answer starts."""

    conditioned: list[int]
    conditioned_answer: int
    alone: list[int]
    alone_answer: int
    answer_tokens: int
    truncated: bool


def start_token(tokenizer: Any) -> int:
    """The token that opens a text (BOS, else EOS): the answer read alone follows it."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the IFD model's tokenizer has neither a BOS nor an EOS token to open "
                     "the answer read alone")


def encode(tokenizer: Any, prompt: str, answer: str, max_length: int) -> Encoded | str:
    """Both readings of one example, or why it cannot be scored (a short reason)."""
    start = [start_token(tokenizer)]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    if not answer_ids:
        return "the response is empty: there is no answer token to score"
    room = max_length - len(start) - len(prompt_ids)
    if room < 1:
        return (f"the question fills max_length={max_length} tokens "
                f"({len(start) + len(prompt_ids)}): no answer token is left to score")
    kept = answer_ids[:room]
    head = start + prompt_ids
    return Encoded(head + kept, len(head), start + kept, len(start), len(kept),
                   len(kept) < len(answer_ids))


def answer_losses(model: Any, sequences: Sequence[tuple[list[int], int]], pad_id: int,
                  batch_size: int = 8, device: str = "cpu") -> list[float]:
    """Mean cross-entropy over each sequence's tokens from ``answer`` on (right-padded batches).

    Equal to ``model(ids, labels=ids with -100 before answer).loss`` row by row.
    """
    import torch

    out = [math.nan] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    for begin in range(0, len(order), max(1, batch_size)):
        chunk = order[begin:begin + max(1, batch_size)]
        width = max(len(sequences[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens, answer = sequences[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
            labels[row, answer:len(tokens)] = torch.tensor(tokens[answer:])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # position t predicts token t+1 (the shift HF's causal-LM loss makes)
        shifted = logits[:, :-1, :].float()
        target = labels[:, 1:].to(shifted.device)
        per_token = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
            reduction="none").view(target.shape)
        counted = (target != IGNORE).sum(dim=1)
        means = per_token.sum(dim=1) / counted.clamp(min=1)
        for row, i in enumerate(chunk):
            out[i] = float(means[row]) if int(counted[row]) else math.nan
    return out


@dataclass
class IFDScore:
    """One example's outcome: both losses and their ratio, or the reason there are none."""

    loss_conditioned: float | None = None
    loss_alone: float | None = None
    ifd: float | None = None
    answer_tokens: int = 0
    truncated: bool = False
    error: str | None = None


class IFDScorer:
    """A causal LM (loaded once per process) that scores examples' IFD in batches."""

    def __init__(self, model: str | None = None, device: str | None = None,
                 batch_size: int = 8, max_length: int = 512):
        from gleaner.devices import default_device
        from gleaner.tasks.deita.score import _load_causal_lm, resolve_model

        self.path, self.gguf_file, self.name = resolve_model(model)
        self.device = default_device(device)
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.tokenizer, self.model = _load_causal_lm(self.path, self.gguf_file, self.device)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else start_token(self.tokenizer))

    def score(self, examples: Sequence[Mapping[str, Any]]) -> list[IFDScore]:
        encoded = [encode(self.tokenizer, question_prompt(e), e.get("output") or "",
                          self.max_length) for e in examples]
        out = [IFDScore(error=e) if isinstance(e, str) else IFDScore() for e in encoded]
        usable = [(i, e) for i, e in enumerate(encoded) if isinstance(e, Encoded)]
        sequences = [(e.conditioned, e.conditioned_answer) for _, e in usable]
        sequences += [(e.alone, e.alone_answer) for _, e in usable]
        losses = answer_losses(self.model, sequences, self.pad_id, self.batch_size, self.device)
        for k, (i, item) in enumerate(usable):
            conditioned, alone = losses[k], losses[k + len(usable)]
            result = out[i]
            result.answer_tokens, result.truncated = item.answer_tokens, item.truncated
            if not (math.isfinite(conditioned) and math.isfinite(alone)) or alone <= 0:
                result.error = f"no finite positive loss (L(A|Q)={conditioned}, L(A)={alone})"
                continue
            result.loss_conditioned, result.loss_alone = conditioned, alone
            result.ifd = conditioned / alone
        return out
