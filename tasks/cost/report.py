"""The cost plan for people: a table in the terminal and in the Prefect UI, the budget gate,
and the actual cost of a finished run next to what was planned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.engine.step import publish_markdown
from gleaner.store import Store


class OverBudget(ValueError):
    """The plan costs more than ``budget.max_usd``; curate does not start (unless --yes)."""


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def _tokens(n: int, bound: bool = False) -> str:
    return ("<= " if bound else "") + f"{n:,}"


def plan_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per stage and model, as a table shows it."""
    return [{"stage": s["stage"], "model": s["model"], "api": s["api"], "rows": s["rows"],
             "finished": s["finished"], "cached": s["cached"], "requests": s["requests"],
             "prompt_tokens": _tokens(s["prompt_tokens"]),
             "completion_tokens": _tokens(s["completion_tokens"], s["completion_bound"]),
             "sync": _usd(s["sync_usd"]), "batch": _usd(s["batch_usd"])}
            for s in plan["stages"]]


def stage_notes(plan: Mapping[str, Any]) -> dict[str, list[str]]:
    """What each stage's figures rest on, each note once with the stages it applies to."""
    notes: dict[str, list[str]] = {}
    for stage in plan["stages"]:
        said = []
        if stage["finished"] or stage["cached"]:
            said.append(f"{stage['finished']:,} rows finished and {stage['cached']:,} from the "
                        "cache are not planned")
        said += stage["notes"]
        said.append(f"prompt tokens by {stage['counter']}" + (
            "; completion tokens at max_tokens (no recorded usage): an upper bound"
            if stage["completion_bound"] else "; completion tokens as recorded per request"))
        for note in said:
            notes.setdefault(note, []).append(stage["stage"])
    return notes


def plan_text(plan: Mapping[str, Any]) -> str:
    head = ("stage", "model", "api", "requests", "prompt tok", "completion tok", "sync",
            "batch")
    rows = [(r["stage"], r["model"], r["api"], f"{r['requests']:,}", r["prompt_tokens"],
             r["completion_tokens"], r["sync"], r["batch"]) for r in plan_rows(plan)]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows, strict=True)]
    lines = [f"cost plan of run {plan['run_id']}: {plan['examples']:,} examples"]
    lines += ["  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
              for line in (head, *rows)]
    for note, stages in stage_notes(plan).items():
        lines.append(f"  {', '.join(stages)}: {note}")
    for ft in plan["finetunes"]:
        lines.append(f"  finetune {ft['arm']}: {ft['examples']:,} examples x {ft['epochs']:g} "
                     f"epochs x {ft['tokens_per_example']:,} tokens = {ft['tokens']:,} tokens "
                     f"({ft['tokenizer']}; {ft['note']})")
    lines.append(f"total: {_usd(plan['total_usd'])} as configured (all synchronous "
                 f"{_usd(plan['total_sync_usd'])}, all through the Batch API "
                 f"{_usd(plan['total_batch_usd'])})")
    if plan.get("unpriced"):
        lines.append(f"no price for {', '.join(plan['unpriced'])} (prices.<model> in the "
                     "config): not in the total")
    if plan.get("max_usd") is not None:
        verdict = "OVER" if plan["over_budget"] else "within"
        lines.append(f"budget: {verdict} budget.max_usd = {_usd(plan['max_usd'])}")
    return "\n".join(lines)


def plan_markdown(plan: Mapping[str, Any]) -> str:
    rows = plan_rows(plan)
    names = list(rows[0]) if rows else []
    lines = [f"# Cost plan of run `{plan['run_id']}`", "",
             f"{plan['examples']:,} examples; total **{_usd(plan['total_usd'])}** as configured "
             f"(synchronous {_usd(plan['total_sync_usd'])}, Batch API "
             f"{_usd(plan['total_batch_usd'])})", ""]
    if rows:
        lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        lines += ["| " + " | ".join(str(r[n]) for n in names) + " |" for r in rows]
    for ft in plan["finetunes"]:
        lines += ["", f"finetune {ft['arm']}: {ft['examples']:,} examples, {ft['tokens']:,} "
                  f"tokens over {ft['epochs']:g} epochs ({ft['tokenizer']})"]
    if plan.get("max_usd") is not None:
        lines += ["", f"budget.max_usd {_usd(plan['max_usd'])}: "
                  + ("**over budget**" if plan["over_budget"] else "within budget")]
    return "\n".join(lines)


def check_budget(plan: Mapping[str, Any], approved: bool = False) -> None:
    """Refuse a plan over ``budget.max_usd`` unless a person said yes."""
    if plan.get("over_budget") and not approved:
        raise OverBudget(
            f"the cost plan of run {plan['run_id']} comes to {_usd(plan['total_usd'])}, more "
            f"than budget.max_usd = {_usd(plan['max_usd'])}; see `gleaner plan` for where it "
            "goes, raise the budget, set an endpoint's api to batch (half price), or pass "
            "--yes to spend it")


def keep_plan(store: Store, run_id: str, plan: Mapping[str, Any]) -> None:
    """The plan with the run (``runs/<id>/cost_plan.json``) and as a Prefect artifact."""
    store.write_json(layout.cost_plan_path(store, run_id), dict(plan))

    publish_markdown(artifact_key("cost-plan", run_id), plan_markdown(plan),
                     f"cost plan of run {run_id}")


def planned_vs_actual(plan: Mapping[str, Any], summaries: Mapping[str, Any]) -> dict[str, Any]:
    """Per planned stage: requests, tokens and dollars planned, and what the run spent."""
    out: dict[str, Any] = {}
    for stage in plan["stages"]:
        actual = summaries.get(stage["stage"]) or {}
        out[stage["stage"]] = {
            "planned_requests": stage["requests"], "requests": actual.get("requests"),
            "planned_prompt_tokens": stage["prompt_tokens"],
            "prompt_tokens": actual.get("prompt_tokens"),
            "planned_completion_tokens": stage["completion_tokens"],
            "completion_tokens": actual.get("completion_tokens"),
            "planned_usd": stage["usd"], "usd": actual.get("est_cost_usd")}
    spent = [v["usd"] for v in out.values() if v["usd"] is not None]
    return {"stages": out, "planned_usd": plan["total_usd"],
            "usd": round(sum(spent), 6) if spent else None}


def cost_lines(cost: Mapping[str, Any]) -> list[str]:
    """The curate summary's cost lines: actual next to planned."""
    lines = [f"cost: {_usd(cost.get('usd'))} spent, {_usd(cost['planned_usd'])} planned"]
    for name, row in cost["stages"].items():
        lines.append(f"  {name}: {row['requests'] if row['requests'] is not None else '-'} "
                     f"requests ({row['planned_requests']:,} planned), {_usd(row['usd'])} "
                     f"({_usd(row['planned_usd'])} planned)")
    return lines


def actual_cost(store: Store, run_id: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    """The finished run's stage summaries next to its plan."""
    from gleaner.engine.runner import read_summary

    return planned_vs_actual(plan, {s["stage"]: read_summary(store, run_id, s["stage"])
                                    for s in plan["stages"]})
