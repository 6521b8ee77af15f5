"""``gleaner curate SOURCE...``: the whole pipeline, as one Prefect flow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    RunIdOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
)


def format_summary(summary: dict[str, Any]) -> str:
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
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(select["reasons"].items()))
    lines.append(f"select: {select['selected']} selected ({reasons})")
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
    evaluation = summary.get("evaluate")
    if evaluation:
        lines.append(f"evaluate: {evaluation.get('report') or evaluation.get('overall')}")
    return "\n".join(lines)


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
    try:
        check_evaluation_inputs(config)  # before starting Prefect and Ray, too
        with execution_environment(config) as api_url:
            if not as_json:
                typer.echo(f"Prefect API: {api_url}  run id: {run_id}", err=True)
            summary = curate_flow(sources=list(sources), config=config, run_id=run_id)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
        return
    emit(summary, as_json, format_summary(summary))
