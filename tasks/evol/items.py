"""EVOL chains to (text, score) items with their lineage: what the scorers train on.

One item per version of every ok chain: its seed, its round (0 = the seed), the method that
made it, its parent (the version it rewrote), the question (quality items score a response
to it), the text and the ranker's score. Failed chains give no item (the stage's rows keep
them with their errors); the counts say how many.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.store import Store
from gleaner.tasks.evol.stage import EVOL_SCHEMA

ITEMS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("seed_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),  # null for the seed itself
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("score", pa.int32(), nullable=False),
])


def item_id(seed_id: str, kind: str, round_: int) -> str:
    return hashlib.sha256(f"{kind}\x00{seed_id}\x00{round_}".encode()).hexdigest()[:32]


def chain_items(chains: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Items of the ok chains of an EVOL stage's rows; and the counts."""
    ok = chains.filter(pc.equal(chains["status"], "ok"))
    rows: list[dict[str, Any]] = []
    for chain in ok.to_pylist():
        parent = None
        for round_, (text, method, score) in enumerate(zip(
                chain["versions"], chain["methods"], chain["scores"], strict=True)):
            this = item_id(chain["id"], chain["kind"], round_)
            rows.append({"id": this, "kind": chain["kind"], "seed_id": chain["id"],
                         "round": round_, "method": method, "parent_id": parent,
                         "instruction": chain["instruction"], "text": text, "score": score})
            parent = this
    failed = chains.filter(pc.equal(chains["status"], "failed"))
    kinds: dict[str, int] = {}
    for kind in failed.column("error_kind").to_pylist():
        kinds[kind or "unknown"] = kinds.get(kind or "unknown", 0) + 1
    counts = {"seeds": chains.num_rows, "chains_ok": ok.num_rows,
              "chains_failed": failed.num_rows, "failures": kinds, "items": len(rows)}
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA), counts


def write_items(store: Store, run_id: str, kind: str) -> dict[str, Any]:
    """Rebuild ``evol/<kind>-items`` from the stage's rows; returns the counts."""
    chains = store.read_stage(run_id, layout.evol_stage(kind), schema=EVOL_SCHEMA)
    items, counts = chain_items(chains)
    stage = layout.evol_items_stage(kind)
    store.clear_stage(run_id, stage)
    store.write_part(run_id, stage, 0, items)
    return {**counts, "items_path": store.uri(store.stage_path(run_id, stage))}
