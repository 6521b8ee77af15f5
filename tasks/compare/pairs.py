"""From graded responses to preference pairs (GPT-4-LLM §3.2, SPEC §8).

For a prompt x with K graded responses, every unordered pair with s_l < s_h gives
(x, y_h = chosen, y_l = rejected, margin = s_h - s_l); ties give no pair, so a prompt gives
at most K(K-1)/2. Responses the judge could not grade take part in no pair; the counts say
how many. ``pairs + ties = sum over prompts of C(k, 2)``, k its graded responses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import pyarrow as pa

from gleaner.schema import TURN_TYPE

PAIRS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("turns", pa.list_(TURN_TYPE), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("chosen_score", pa.float64(), nullable=False),
    pa.field("rejected_score", pa.float64(), nullable=False),
    pa.field("margin", pa.float64(), nullable=False),
    pa.field("chosen_id", pa.string(), nullable=False),
    pa.field("rejected_id", pa.string(), nullable=False),
    pa.field("chosen_sources", pa.list_(pa.string()), nullable=False),
    pa.field("rejected_sources", pa.list_(pa.string()), nullable=False),
])


@dataclass(frozen=True)
class Scored:
    """One graded response (``score`` None: the judge failed on it)."""

    id: str
    response: str
    score: float | None
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pair:
    chosen: Scored
    rejected: Scored

    @property
    def margin(self) -> float:
        return float(self.chosen.score) - float(self.rejected.score)  # type: ignore[arg-type]


def prompt_pairs(responses: Sequence[Scored]) -> tuple[list[Pair], int]:
    """Every pair with s_l < s_h among the graded responses of one prompt; and the ties."""
    graded = [r for r in responses if r.score is not None]
    pairs, ties = [], 0
    for a, b in combinations(graded, 2):
        if a.score == b.score:
            ties += 1
            continue
        high, low = (a, b) if a.score > b.score else (b, a)  # type: ignore[operator]
        pairs.append(Pair(high, low))
    return pairs, ties


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{chosen}\x00{rejected}".encode()).hexdigest()[:32]


def build_pairs(responses: Iterable[Mapping[str, Any]], grades: Mapping[str, Mapping[str, Any]]
                ) -> tuple[pa.Table, dict[str, int]]:
    """Pairs from the response rows (gleaner.tasks.compare.sources) and their grades by id."""
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for row in responses:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    out: list[dict[str, Any]] = []
    counts = {"prompts": len(by_prompt), "scored": 0, "failed": 0, "pairs": 0,
              "ties_skipped": 0, "prompts_without_pair": 0}
    for pid, rows in by_prompt.items():
        scored = []
        for row in rows:
            g = grades.get(row["id"]) or {}
            ok = g.get("status") == "ok" and g.get("score") is not None
            counts["scored" if ok else "failed"] += 1
            scored.append(Scored(row["id"], row["response"], g.get("score") if ok else None,
                                 tuple(row["sources"])))
        pairs, ties = prompt_pairs(scored)
        counts["pairs"] += len(pairs)
        counts["ties_skipped"] += ties
        counts["prompts_without_pair"] += not pairs
        first = rows[0]
        for p in pairs:
            out.append({"id": pair_id(pid, p.chosen.id, p.rejected.id), "prompt_id": pid,
                        "turns": first["turns"], "instruction": first["instruction"],
                        "input": first["input"], "chosen": p.chosen.response,
                        "rejected": p.rejected.response, "chosen_score": p.chosen.score,
                        "rejected_score": p.rejected.score, "margin": p.margin,
                        "chosen_id": p.chosen.id, "rejected_id": p.rejected.id,
                        "chosen_sources": list(p.chosen.sources),
                        "rejected_sources": list(p.rejected.sources)})
    return pa.Table.from_pylist(out, schema=PAIRS_SCHEMA), counts
