"""``gleaner experiment --config FILE``: the grid of selectors x budgets, in one resumable run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.artifacts import flow_run_url
from gleaner.flows.cli_app import (
    JsonOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
    run_or_fail,
)


def result_text(result: dict[str, Any], api_url: str | None = None) -> str:
    lines = [result["markdown"].rstrip(), "", f"table: {result['table']}",
             f"plot: {result['plot']}"]
    url = flow_run_url(api_url, result.get("flow_run_id"))
    if url:
        lines.append(f"Prefect run: {url}")
    return "\n".join(lines)


@app.command("experiment")
def experiment(
    config_file: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False,
                                     help="YAML config with an experiment section."),
    store: str | None = StoreOption,
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id (default: experiment-<name>, so a rerun resumes)."),
    yes: bool = typer.Option(False, "--yes", help="Spend above the configured limits."),
    plan: bool = typer.Option(False, "--plan", help="Print what it would cost; run nothing."),
    as_json: bool = JsonOption,
) -> None:
    """Select every arm from one pool, fine-tune each alike, judge each against the baseline."""
    config = build_config(config_file, **{"store.url": store, "run_id": run_id})
    if len(config.experiment.arms) < 2:
        fail("experiment.arms needs at least two arms (one of them the baseline)")
    from gleaner.flows.experiment_flow import experiment_flow, experiment_run_id
    from gleaner.runtime import execution_environment
    from gleaner.tasks.experiment import budget
    from gleaner.tasks.experiment.steps import ArmsFailed

    run = experiment_run_id(config, run_id)
    if plan:
        planned = run_or_fail(budget.plan_only, config, run)
        emit(planned, as_json, budget.text(planned))
        return

    def go() -> tuple[dict[str, Any], str, ArmsFailed | None]:
        with execution_environment(config) as api_url:
            try:
                return experiment_flow(config=config, run_id=run, approved=yes), api_url, None
            except ArmsFailed as failure:
                return failure.result, api_url, failure

    result, api_url, failure = run_or_fail(go)
    shown = {k: v for k, v in result.items() if k != "markdown"}
    emit(shown, as_json, result_text(result, api_url))
    if failure is not None:
        typer.echo(f"gleaner: error: {failure}", err=True)
        raise typer.Exit(1)
