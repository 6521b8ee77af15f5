"""``gleaner view``: a local web page over a run's store (pool, counts, evaluation, review)."""

from __future__ import annotations

from pathlib import Path

import typer

from gleaner.flows.cli_app import ConfigOption, StoreOption, app, build_config, fail


@app.command("view")
def view(
    run_id: str = typer.Option(..., "--run-id", help="The run to look at."),
    store: str | None = StoreOption,
    config_file: Path | None = ConfigOption,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on. Anything but loopback asks every "
        "request for the token this command prints."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to listen on."),
    reviewer: str | None = typer.Option(
        None, "--reviewer", help="The name an exclusion or flag is recorded under when the "
        "page gives none (default: your OS user)."),
) -> None:
    """A web page over the run, read in place: the pool with every signal, filters, search
    and paging; the summaries' counts and histograms; evaluation pairs with both reviews;
    links to the Prefect flow runs. Exclude or flag examples: the next selection honours it."""
    from gleaner.flows.viewer.server import serve
    from gleaner.store import Store
    from gleaner.tasks.select.review import default_reviewer

    config = build_config(config_file, check_store=False, **{"store.url": store})
    target = Store(config.store.url, config.store.options)
    if run_id not in target.list_runs():
        fail(f"run {run_id!r} not found in {target.uri(target.root)}")
    api, ui = prefect_urls()
    try:
        serve(target, run_id, host=host, port=port, reviewer=reviewer or default_reviewer(),
              prefect_api=api, prefect_ui=ui, announce=typer.echo)
    except FileNotFoundError as error:
        fail(str(error))


def prefect_urls() -> tuple[str | None, str | None]:
    """The Prefect API and UI this machine's profile points at (None: none configured)."""
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

        return PREFECT_API_URL.value(), PREFECT_UI_URL.value()
    except Exception:  # an unreadable profile: the page says there is no Prefect API
        return None, None
