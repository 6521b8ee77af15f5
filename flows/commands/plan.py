"""``gleaner plan SOURCE...``: what curating the sources would send to priced models and cost."""

from __future__ import annotations

from pathlib import Path

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
    run_or_fail,
)


@app.command("plan")
def plan(
    sources: list[str] = typer.Argument(..., help="Files, globs or fsspec URLs to curate."),
    config_file: Path | None = ConfigOption,
    store: str | None = StoreOption,
    run_id: str | None = RunIdOption,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N records."),
    as_json: bool = JsonOption,
) -> None:
    """Requests, tokens and cost (synchronous and Batch API) per stage, before anything is
    sent: the run's finished parts and the cache are subtracted; nothing is written."""
    config = build_config(config_file, **{"store.url": store, "run_id": run_id,
                                          "ingest.limit": limit})
    from gleaner.runs import new_run_id
    from gleaner.tasks.cost.plan import plan_sources
    from gleaner.tasks.cost.report import plan_text
    from gleaner.tasks.ingest.ingest import IngestError

    try:
        result = run_or_fail(plan_sources, sources, config, config.run_id or new_run_id())
    except IngestError as error:
        fail(str(error))
    emit(result, as_json, plan_text(result))
