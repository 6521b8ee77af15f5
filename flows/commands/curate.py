"""``gleaner curate SOURCE...``: the whole pipeline, as one Prefect flow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.artifacts import flow_run_url
from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    RunIdOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
    run_or_fail,
)


def threshold_note(summary: dict[str, Any]) -> str | None:
    """In words, when AlpaGasus' threshold keeps nothing, and what selection did instead."""
    rate, select = summary.get("rate") or {}, summary["select"]
    if not rate.get("rated") or rate.get("kept"):
        return None
    buckets = [float(b) for b, n in (rate.get("histogram") or {}).items() if n]
    highest = f"; the highest score is about {max(buckets):g}" if buckets else ""
    text = (f"note: the AlpaGasus threshold {rate.get('threshold')} keeps none of the "
            f"{rate['rated']} rated examples{highest} (the offline SmolLM2 rater scores low)")
    if select["reasons"].get("below_threshold"):
        return text + "; selection filtered on it, so nothing was selected"
    return (text + f"; selection did not filter on the rating: the {select['selector']} "
            f"selector picked {select['selected']} by {select.get('sort_by')} instead")


def evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The W/T/L table per test set and overall, with the winning score (W - L) / N + 1."""
    lines = [f"evaluate: {evaluation['model_a']} vs {evaluation['model_b']} "
             f"({evaluation['rule']} rule, judge {evaluation['judge_model']})",
             f"  {'test set':<14} {'win':>5} {'tie':>5} {'lose':>5} {'failed':>7} "
             f"{'winning score':>14} {'LC win rate':>12}"]
    rows = [*evaluation["test_sets"].items(), ("overall", evaluation["overall"])]
    for name, part in rows:
        score, lc = part.get("winning_score"), part.get("lc_win_rate")
        lines.append(f"  {name:<14} {part['win']:>5} {part['tie']:>5} {part['lose']:>5} "
                     f"{part['failed']:>7} {'n/a' if score is None else f'{score:.3f}':>14} "
                     f"{'n/a' if lc is None else f'{100 * lc:.1f} %':>12}")
    lines.append(f"  report: {evaluation['report']}")
    return lines


def format_summary(summary: dict[str, Any], api_url: str | None = None) -> str:
    ingest, select = summary["ingest"], summary["select"]
    rate = summary.get("rate") or {}
    lines = [
        f"run {summary['run_id']} in {summary['store']}",
        f"ingest: read {ingest['read']} = kept {ingest['kept']} + quarantined "
        f"{ingest['quarantined']} + duplicates {ingest['duplicates']}",
    ]
    if rate:
        lines.append(
            f"rate: {rate.get('rated', 0)} rated ({rate.get('failed', 0)} failed), "
            f"{rate.get('kept', 0)} at or above {rate.get('threshold')}, "
            f"{rate.get('requests', 0)} requests, est. ${rate.get('est_cost_usd') or 0:.4f}"
        )
    note = threshold_note(summary)
    if note:
        lines.append(note)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(select["reasons"].items()))
    lines.append(f"select: {select['selected']} selected ({reasons})")
    approval = summary.get("approval")
    if approval:
        lines.append(f"approval: {approval.get('state')}"
                     + (f" by {approval['by']}" if approval.get("by") else "")
                     + (f" ({approval['note']})" if approval.get("note") else ""))
    version = summary.get("dataset")
    if version:
        diff = version["diff"]
        lines.append(
            f"dataset {version['name']} {version['label']}: {version['uri']} "
            f"(+{diff['added']} / -{diff['removed']} / ={diff['unchanged']} vs previous)"
        )
    for name, result in (summary.get("finetune") or {}).items():
        if isinstance(result, dict) and "model" in result:
            lines.append(f"finetune {name}: {result['model']} (loss {result.get('final_loss')})")
    if summary.get("evaluate"):
        lines += evaluation_lines(summary["evaluate"])
    if summary.get("cost"):
        from gleaner.tasks.cost.report import cost_lines

        lines += cost_lines(summary["cost"])
    url = flow_run_url(api_url, summary.get("flow_run_id"))
    if url:
        lines.append(f"Prefect run: {url}")
    return "\n".join(lines)


def cost_gate(sources: list[str], config: Any, run_id: str, dry_run: bool, yes: bool,
              as_json: bool) -> dict[str, Any] | None:
    """The cost plan before anything runs: printed (--dry-run), or checked against
    budget.max_usd (refused unless --yes). None: no budget, the flow makes the plan."""
    if not dry_run and config.budget.max_usd is None:
        return None
    from gleaner.tasks.cost.plan import plan_sources
    from gleaner.tasks.cost.report import OverBudget, check_budget, plan_text
    from gleaner.tasks.ingest.ingest import IngestError

    try:
        plan = run_or_fail(plan_sources, sources, config, run_id)
    except IngestError as error:
        fail(str(error))
    if dry_run:
        emit(plan, as_json, plan_text(plan))
        return plan
    try:
        check_budget(plan, approved=yes)
    except OverBudget as error:
        typer.echo(plan_text(plan), err=True)
        fail(str(error))
    return plan


@app.command("curate")
def curate(
    sources: list[str] = typer.Argument(..., help="Files, globs or fsspec URLs to curate."),
    config_file: Path | None = ConfigOption,
    store: str | None = StoreOption,
    run_id: str | None = RunIdOption,
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Read only the first N records (demos, smoke runs)."
    ),
    train: bool | None = typer.Option(None, "--train/--no-train", help="Fine-tune after select."),
    evaluate: bool | None = typer.Option(
        None, "--eval/--no-eval", help="Judge the fine-tuned model against the baseline."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the cost plan (as `gleaner plan`) and stop."
    ),
    yes: bool = typer.Option(
        False, "--yes", help="Start even when the cost plan exceeds budget.max_usd."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Ingest, rate, score, embed, select, publish a dataset version, then fine-tune and judge."""
    from gleaner.flows.curate import curate_flow
    from gleaner.runtime import execution_environment
    from gleaner.tasks.evaluate.eval_sets import check_evaluation_inputs

    config = build_config(
        config_file,
        **{
            "store.url": store,
            "run_id": run_id,
            "ingest.limit": limit,
            "curate.train": train,
            "curate.evaluate": evaluate,
        },
    )
    from gleaner.runs import new_run_id

    run_id = config.run_id or new_run_id()
    plan = cost_gate(sources, config, run_id, dry_run, yes, as_json)
    if dry_run:
        return

    def run() -> tuple[dict[str, Any], str]:
        check_evaluation_inputs(config)  # before starting Prefect and Ray, too
        with execution_environment(config) as api_url:
            if not as_json:
                typer.echo(f"Prefect API: {api_url}  run id: {run_id}", err=True)
            return curate_flow(sources=list(sources), config=config, run_id=run_id,
                               cost_plan=plan, approve_cost=yes), api_url

    summary, api_url = run_or_fail(run)
    emit(summary, as_json, format_summary(summary, api_url))
    approval = summary.get("approval")
    if approval and approval.get("state") != "approved":  # publish.approval: required
        from gleaner.tasks.publish.approval import not_published_message

        fail(f"run {run_id}: {not_published_message(approval)}", code=1)
