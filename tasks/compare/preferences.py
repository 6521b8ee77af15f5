"""Comparison pairs as preference rows: ``prompt``, ``chosen``, ``rejected``.

GPT-4-LLM's comparison data (``gleaner compare``) holds, per pair, the prompt (instruction,
input, earlier turns) and two graded responses. A policy trained on them (DPO) reads the
prompt as the SFT model was trained to read it (the format saved with it,
``gleaner_sft.json``: Alpaca's template, the chat template or LIMA's end-of-turn format) and
each response closed as it was trained to close it (EOS, or the end-of-turn token). This is
the one conversion from pairs to preference rows: DPO trains on these rows (TRL's trainer
tokenises them), and an export writes them as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.store import Store
from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
from gleaner.tasks.train.sft_data import (
    DEFAULT_EOT_TOKEN,
    SftFormat,
    conversation_prompt,
    generation_prompt,
)

PREFERENCE_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
])


def read_pairs(store: Store, run_id: str) -> pa.Table:
    """The run's comparison pairs; a clear error when ``gleaner compare`` has not run."""
    if not store.has_stage(run_id, layout.COMPARE_PAIRS):
        raise FileNotFoundError(f"run {run_id!r} has no comparison pairs in {store.url}; "
                                "run gleaner compare first")
    return store.read_stage(run_id, layout.COMPARE_PAIRS, schema=PAIRS_SCHEMA)


def run_pairs(store: Store, run_id: str, fraction: float, seed: int, key: str,
              pairs: pa.Table | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(all pairs, training pairs, held-out pairs) of the run (or ``pairs``, e.g. a published
    preference version); held out by whole prompts."""
    from gleaner.tasks.reward.data import split_pairs

    pairs = read_pairs(store, run_id) if pairs is None else pairs
    if pairs.num_rows == 0:
        raise ValueError(f"run {run_id!r} has no comparison pairs (every prompt tied or "
                         "failed?); see the compare summary")
    train_pairs, heldout_pairs = split_pairs(pairs, fraction, seed)
    if train_pairs.num_rows == 0:
        raise ValueError(f"every pair is held out: lower {key}.heldout_fraction")
    return pairs, train_pairs, heldout_pairs


def response_end(tokenizer: Any, fmt: SftFormat) -> str:
    """What closes a response in the SFT format: the end-of-turn token, else EOS."""
    if fmt.template == "eot":
        return fmt.end_of_turn_token or DEFAULT_EOT_TOKEN
    return tokenizer.eos_token or ""


def pair_prompt(pair: Mapping[str, Any], tokenizer: Any, fmt: SftFormat) -> str:
    turns = [dict(t) for t in (pair.get("turns") or [])]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if len(turns) > 1:
        return conversation_prompt(turns, tokenizer, fmt)
    return generation_prompt(pair["instruction"], pair.get("input") or "", tokenizer, fmt)


def preference_rows(pairs: Iterable[Mapping[str, Any]], tokenizer: Any, fmt: SftFormat
                    ) -> list[dict[str, str]]:
    """``prompt`` / ``chosen`` / ``rejected`` texts, one row a pair, in order."""
    end = response_end(tokenizer, fmt)
    return [{"prompt": pair_prompt(pair, tokenizer, fmt), "chosen": pair["chosen"] + end,
             "rejected": pair["rejected"] + end} for pair in pairs]


@dataclass
class PreferenceSet:
    table: pa.Table  # prompt, chosen, rejected (texts; the trainer tokenises them)
    pairs: int
    trimmed: int  # pairs whose prompt + longer response exceed max_length (cut at the end)
    tokens: int


def preference_set(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> PreferenceSet:
    """The rows as the trainer's table, with their token counts against ``max_length``."""
    trimmed = tokens = 0
    for row in rows:
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        answers = [len(tokenizer(row[k], add_special_tokens=False)["input_ids"])
                   for k in ("chosen", "rejected")]
        trimmed += prompt + max(answers) > max_length
        tokens += prompt + sum(answers)
    return PreferenceSet(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), len(rows),
                         trimmed, tokens)
