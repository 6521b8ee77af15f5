"""What the reward model reads: (prompt, response) rendered as the SFT model sees it, tokenised.

The text of (x, y) is the fine-tuning rendering (tasks/train/sft_data.py ``render``) of the
example with y as its response, EOS included: Alpaca's template for a single turn, the
model's chat template for a conversation. The same function renders training pairs and the
examples the score stage scores, so r is read from the same kind of text it learnt on.
Texts over ``max_length`` tokens keep their *last* tokens (the response and its end, where the
sequence-classification head reads r), and are counted as trimmed.

Held-out pairs are whole prompts (every pair of a prompt on one side), so held-out accuracy
measures responses to prompts the model never saw ranked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner.tasks.train.sft_data import SftFormat, render

PAIR_IDS_SCHEMA = pa.schema([
    pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
])


def with_response(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    """An example (or a pair's prompt) with ``response`` as its answer."""
    turns = [dict(t) for t in (record.get("turns") or record.get("conversation") or [])]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    return {"instruction": record["instruction"], "input": record.get("input") or "",
            "output": response,
            "conversation": [*turns, {"role": "assistant", "content": response}] if turns
            else []}


def encode(record: Mapping[str, Any], tokenizer: Any, fmt: SftFormat, max_length: int
           ) -> tuple[list[int], bool]:
    """Token ids of the rendered (prompt, response); the last ``max_length`` when longer."""
    text, _ = render(dict(record), tokenizer, fmt)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return (ids[-max_length:], True) if len(ids) > max_length else (ids, False)


@dataclass
class EncodedPairs:
    table: pa.Table  # chosen_ids, rejected_ids
    pairs: int
    trimmed: int  # pairs with a side cut to max_length (from the left)
    tokens: int


def encode_pairs(rows: Iterable[Mapping[str, Any]], tokenizer: Any, fmt: SftFormat,
                 max_length: int) -> EncodedPairs:
    chosen, rejected, trimmed = [], [], 0
    for row in rows:
        c, cut_c = encode(with_response(row, row["chosen"]), tokenizer, fmt, max_length)
        r, cut_r = encode(with_response(row, row["rejected"]), tokenizer, fmt, max_length)
        chosen.append(c)
        rejected.append(r)
        trimmed += cut_c or cut_r
    table = pa.table({"chosen_ids": pa.array(chosen, pa.list_(pa.int32())),
                      "rejected_ids": pa.array(rejected, pa.list_(pa.int32()))},
                     schema=PAIR_IDS_SCHEMA)
    return EncodedPairs(table, len(chosen), trimmed,
                        sum(len(c) + len(r) for c, r in zip(chosen, rejected, strict=True)))


def heldout_prompts(prompt_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Which prompts are held out: the ``fraction`` (at least one, never all) whose seeded
    hash is smallest; none when ``fraction`` is 0 or there is a single prompt."""
    distinct = sorted(set(prompt_ids))
    if fraction <= 0 or len(distinct) < 2:
        return set()
    count = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    ranked = sorted(distinct, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return set(ranked[:count])


def split_pairs(pairs: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(training pairs, held-out pairs), split by whole prompts."""
    held = heldout_prompts(pairs.column("prompt_id").to_pylist(), fraction, seed)
    mask = pc.is_in(pairs.column("prompt_id"), value_set=pa.array(sorted(held), pa.string()))
    return pairs.filter(pc.invert(mask)), pairs.filter(mask)
