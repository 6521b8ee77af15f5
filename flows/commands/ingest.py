"""``gleaner ingest SOURCE...``: read instruction data into a run's ``ingest`` stage."""

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
)
from gleaner.runs import new_run_id
from gleaner.tasks.ingest.ingest import IngestError, format_summary, source_options
from gleaner.tasks.ingest.readers import SourceError, expand_sources


@app.command("ingest")
def ingest(
    sources: list[str] = typer.Argument(
        ..., help="Files, globs, folders or fsspec URLs (s3://...); several at once."
    ),
    store: str | None = StoreOption,
    run_id: str | None = RunIdOption,
    format: str | None = typer.Option(
        None,
        "--format",
        "-f",
        help="Force a record format: alpaca, dolly, lima, sharegpt, messages (default: auto).",
    ),
    config_file: Path | None = ConfigOption,
    force: bool = typer.Option(False, "--force", help="Redo an ingest this run already holds."),
    as_json: bool = JsonOption,
) -> None:
    """Ingest instruction data: normalise, quarantine bad rows, drop exact duplicates."""
    config = build_config(
        config_file, **{"store.url": store, "run_id": run_id, "ingest.format": format}
    )
    run_id = config.run_id or new_run_id()
    try:  # fail fast, before any Prefect or store work, on a source that is not there
        expand_sources(sources, source_options(sources, config))
    except SourceError as error:
        fail(str(error))

    from gleaner.flows.ingest_flow import ingest_flow
    from gleaner.runtime import prefect_api, resolve_prefect_api

    try:
        with prefect_api(resolve_prefect_api(config)):
            summary = ingest_flow(sources, run_id=run_id, config=config, force=force)
    except (IngestError, ValueError) as error:
        fail(str(error))
    emit(summary, as_json, format_summary(summary))

