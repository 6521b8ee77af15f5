"""``gleaner publish --to-hub REPO_ID``: a published dataset version to the Hugging Face Hub."""

from __future__ import annotations

import os
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


@app.command("publish")
def publish(
    to_hub: str = typer.Option(..., "--to-hub", help="The Hub dataset repo: user/name or "
                               "org/name (created when missing)."),
    name: str | None = typer.Option(
        None, "--name", help="The dataset (default: curate.dataset_name)."),
    version: int | None = typer.Option(
        None, "--version", min=1, help="Which version (default: the latest)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    token_env: str = typer.Option(
        "HF_TOKEN", "--token-env", help="The environment variable holding the Hub token "
        "(unset: the token of `hf auth login`)."),
    store: str | None = StoreOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Push a dataset version (its rows, dataset card and provenance.json) to the Hugging Face
    Hub."""
    from gleaner.store import Store
    from gleaner.tasks.publish.hub import HubUnavailable, check_repo_id, push_version

    try:
        check_repo_id(to_hub)
    except ValueError as error:
        fail(str(error))
    config = build_config(config_file, **{"store.url": store})
    st = Store(config.store.url, config.store.options)
    dataset = name or config.curate.dataset_name
    try:  # not run_or_fail: a refused connection here is the Hub's, not the store's
        summary = push_version(st, dataset, version, to_hub, private,
                               os.environ.get(token_env) or None)
    except HubUnavailable as error:
        fail(str(error), code=1)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    emit(summary, as_json, f"pushed {summary['name']} {summary['label']} "
         f"({summary['rows']:,} rows) to {summary['url']}")
