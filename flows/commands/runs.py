"""``gleaner runs [--store URL] [--json]``: the store's runs and their state;
``gleaner runs show ID``: one run in detail."""

from __future__ import annotations

from pathlib import Path

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
)

runs_app = typer.Typer(
    help="The store's runs: state (running, failed, awaiting approval, finished), stages "
    "done / running / failed, the dataset version each published, and cost.",
    no_args_is_help=False, invoke_without_command=True)
app.add_typer(runs_app, name="runs")


def _store(config_file: Path | None, store: str | None):  # -> gleaner.store.Store
    from gleaner.store import Store

    config = build_config(config_file, **{"store.url": store})
    return Store(config.store.url, config.store.options)


@runs_app.callback()
def runs(
    ctx: typer.Context,
    store: str | None = StoreOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """List the store's runs: id, started, state, stages done / running / failed, awaiting
    approval, the dataset version published, cost. `gleaner runs show ID` for one run."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"store": store, "config_file": config_file, "as_json": as_json}
        return
    from gleaner.tasks.runs.status import list_run_status, runs_table

    opened = _store(config_file, store)
    found = list_run_status(opened)
    if not found:
        fail(f"no runs in {opened.url}: start one with `gleaner ingest` or `gleaner curate`, "
             "or point --store (or store.url) at the store that holds them", code=1)
    emit({"store": opened.url, "runs": found}, as_json, runs_table(found))


@runs_app.command("show")
def show(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="The run to show."),
    store: str | None = StoreOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """One run in detail: each stage's state, counts and cost, its steps, approval, the
    dataset versions it published, spent and planned cost."""
    from gleaner.store import validate_run_id
    from gleaner.tasks.runs.status import UnknownRun, run_status, run_text

    given = ctx.obj or {}
    store = store or given.get("store")
    config_file = config_file or given.get("config_file")
    as_json = as_json or given.get("as_json", False)
    try:
        validate_run_id(run_id)
    except ValueError as error:
        fail(str(error))
    opened = _store(config_file, store)
    try:
        status = run_status(opened, run_id)
    except UnknownRun as error:
        fail(str(error))
    emit(status, as_json, run_text(status))
