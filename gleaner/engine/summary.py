"""A stage's summary: counts that add up, tokens, cost, failures by cause.

Built from the parts themselves (not from what the driver remembers), so a
resumed or refreshed run reports the whole stage. ``ok + failed`` must equal
the input's rows, or the stage raises: nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner.config import PriceConfig


def _sum(table: pa.Table, column: str, fresh: pa.Array) -> int:
    if column not in table.column_names:
        return 0
    return int(pc.sum(table[column].filter(fresh)).as_py() or 0)


def estimate_cost(price: PriceConfig | None, prompt: int, completion: int) -> float | None:
    if price is None:
        return None
    return round(prompt / 1e6 * price.prompt + completion / 1e6 * price.completion, 6)


def stage_counts(table: pa.Table, expected_rows: int, stage: str) -> dict[str, Any]:
    status = table.column("status")
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    failed = int(pc.sum(pc.equal(status, "failed")).as_py() or 0)
    if ok + failed != table.num_rows or table.num_rows != expected_rows:
        raise RuntimeError(
            f"{stage}: counts do not add up: {ok} ok + {failed} failed in {table.num_rows} rows "
            f"for {expected_rows} input rows (a bug, never data: please report it)"
        )
    cached = table.column("cached")
    fresh = pc.invert(cached)
    kinds = Counter(k or "unknown" for k, s in zip(table.column("error_kind").to_pylist(),
                                                   status.to_pylist(), strict=True)
                    if s == "failed")
    return {
        "examples": expected_rows,
        "ok": ok,
        "failed": failed,
        "cached": int(pc.sum(cached).as_py() or 0),
        "failures": dict(sorted(kinds.items())),
        "requests": _sum(table, "attempts", fresh),
        "prompt_tokens": _sum(table, "prompt_tokens", fresh),
        "completion_tokens": _sum(table, "completion_tokens", fresh),
    }


def counts_markdown(summary: Mapping[str, Any]) -> str:
    """The engine's part of every stage artifact: where each row went and what it cost."""
    lines = [
        f"# {summary['stage']} of run {summary['run_id']}", "",
        "| rows | ok | failed | from the cache | batches | resumed |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {summary['examples']:,} | {summary['ok']:,} | {summary['failed']:,} | "
        f"{summary['cached']:,} | {summary['batches']:,} | {summary['batches_resumed']:,} |",
    ]
    if summary.get("failures"):
        lines += ["", "| failure | rows |", "|---|---:|"]
        lines += [f"| {kind} | {n:,} |" for kind, n in summary["failures"].items()]
    if summary.get("requests"):
        cost = summary.get("est_cost_usd")
        lines += ["", f"{summary['requests']:,} requests, {summary['prompt_tokens']:,} prompt + "
                  f"{summary['completion_tokens']:,} completion tokens"
                  + (f", est. ${cost:,.4f}" if cost is not None else ", price unknown")]
    if summary.get("status") not in (None, "completed"):
        lines += ["", f"**{summary['status']}**: {summary.get('stopped_because', '')}"]
    return "\n".join(lines)
