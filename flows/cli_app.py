"""The typer application every command module registers on, and helpers they share."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from gleaner.config import GleanerConfig, load_config

app = typer.Typer(
    name="gleaner",
    help="Curate instruction-tuning data: ingest, rate, score, embed, select, finetune, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config file.", exists=True, dir_okay=False
)
StoreOption = typer.Option(
    None, "--store", help="Store URL: a folder, s3://bucket/prefix, any fsspec URL."
)
RunIdOption = typer.Option(None, "--run-id", help="Run id (generated when not given).")
JsonOption = typer.Option(False, "--json", help="Print one JSON object instead of a human summary.")


def build_config(config_file: Path | None, **overrides: Any) -> GleanerConfig:
    """Config file, then CLI flags (dotted keys; None = not given). Errors exit with a message."""
    try:
        return load_config(config_file, overrides)
    except ValueError as error:
        fail(str(error))
        raise  # unreachable; keeps type checkers content


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"gleaner: error: {message}", err=True)
    raise typer.Exit(code)


def emit(summary: dict[str, Any], as_json: bool, human: str) -> None:
    """One JSON object on stdout with --json; the human text otherwise."""
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    else:
        typer.echo(human)


@app.callback()
def _group() -> None:
    """Curate instruction-tuning data: ingest, rate, score, embed, select, finetune, evaluate."""
    # A callback keeps `gleaner <command>` a command group even while only one command is
    # registered (typer would otherwise run that command directly and treat its name as an arg).
