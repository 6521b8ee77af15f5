"""A stage's summary: counts that add up, tokens, cost, failures by cause.

Built from the parts themselves (not from what the driver remembers), so a
resumed or refreshed run reports the whole stage. ``ok + failed`` must equal
the input's rows, or the stage raises: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner.config import PriceConfig

if TYPE_CHECKING:
    from gleaner.engine.plan import Plan


def _sum(table: pa.Table, column: str, fresh: pa.Array) -> int:
    if column not in table.column_names:
        return 0
    return int(pc.sum(table[column].filter(fresh)).as_py() or 0)


def estimate_cost(price: PriceConfig | None, prompt: int, completion: int,
                  batch_prompt: int = 0, batch_completion: int = 0) -> float | None:
    """USD for the tokens; the ``batch_`` share of them at the Batch API's price."""
    if price is None:
        return None
    # a batch whose rows were later failed or redone keeps its (billed) batch tokens, which
    # the rows' own counts no longer hold: the synchronous share is never below zero
    sync = max(prompt - batch_prompt, 0) / 1e6 * price.prompt
    sync += max(completion - batch_completion, 0) / 1e6 * price.completion
    batch = (batch_prompt / 1e6 * price.prompt + batch_completion / 1e6 * price.completion)
    return round(sync + batch * price.batch, 6)


def stage_cost(price: PriceConfig | None, summary: dict[str, Any]) -> float | None:
    """A stage's cost from its summary's tokens; what went through the Batch API (its
    ``batch_api`` entry) at the batch price, which that entry then states with the saving."""
    usage = summary.get("batch_api") or {}
    bp, bc = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cost = estimate_cost(price, summary["prompt_tokens"], summary["completion_tokens"], bp, bc)
    if usage and price is not None:
        full = estimate_cost(price, bp, bc) or 0.0
        usage["cost_usd"] = round(full * price.batch, 6)
        usage["saved_usd"] = round(full - usage["cost_usd"], 6)
    return cost


def batch_note(summary: Mapping[str, Any]) -> str:
    """The engine's words about the Batch API under every stage artifact ('' when unused)."""
    usage = summary.get("batch_api")
    if not usage:
        return ""
    saved = f", ${usage['saved_usd']:,.4f} saved" if "saved_usd" in usage else ""
    return (f"\n\n{usage['examples']:,} examples through the Batch API: {usage['requests']:,} "
            f"answers in {usage['batches']} batches over {usage['rounds']} rounds "
            f"({usage['lost']:,} lost by the provider, sent again or failed), billed at the "
            f"batch price{saved}; which examples: `{usage['examples_file']}`")


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
    failed_kinds = pc.fill_null(table.column("error_kind").filter(pc.equal(status, "failed")),
                                "unknown")
    kinds = {item["values"]: item["counts"] for item in
             pc.value_counts(failed_kinds).to_pylist()} if failed else {}
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


def stage_summary(stage: Any, run_id: str, plan: Plan, table: pa.Table, usage: Mapping[str, int],
                  price: PriceConfig | None, *, examples: int, fatal: BaseException | None,
                  **fields: Any) -> dict[str, Any]:
    """What every stage's summary says: who, the plan, counts that add up (a stopped stage:
    the rows it holds), tokens with the driver's own calls, and cost (``fields`` may carry a
    ``batch_api`` entry, billed at the batch price)."""
    summary: dict[str, Any] = {"run_id": run_id, "stage": stage.name, "key": plan.key,
                               "settings": plan.resolved, **fields}
    if fatal is None:
        summary.update(stage_counts(table, examples, stage.name), status="completed")
    else:
        summary.update(stage_counts(table, table.num_rows, stage.name))
        summary.update(status="stopped", stopped_because=str(fatal), examples=examples)
    for name in ("requests", "prompt_tokens", "completion_tokens"):
        summary[name] += usage.get(name, 0)
    cost = stage_cost(price, summary)
    summary.update(est_cost_usd=cost if cost is not None else 0.0, price_known=cost is not None)
    return summary


def publish_summary(stage: Any, run_id: str, summary: Mapping[str, Any]) -> None:
    """The stage's markdown artifact (inside a flow run only: outside one there is no UI)."""
    from gleaner.engine.step import publish_markdown

    publish_markdown(f"{stage.name}-summary-{run_id}",
                     stage.markdown(summary) + batch_note(summary),
                     stage.description or f"{stage.name} of run {run_id}")
