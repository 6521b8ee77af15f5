"""``gleaner config upgrade FILE``: a config file with every renamed key under its new name."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from gleaner.flows.cli_app import app, fail

config_app = typer.Typer(help="Config files: upgrade renamed keys.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("upgrade")
def upgrade(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A gleaner YAML config."),
    write: bool = typer.Option(False, "--write", help="Rewrite the file in place."),
) -> None:
    """Print (or --write) the file with renamed keys under their new names; it must then
    validate. A deployment's config in its parameters is upgraded the same way: save it to
    a file, upgrade it, and deploy again."""
    from gleaner.config import GleanerConfig, describe, upgrade_document

    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        fail(f"config file {path} must hold a mapping at the top level")
    upgraded, moved = upgrade_document(document)
    from pydantic import ValidationError

    try:
        GleanerConfig.model_validate(upgraded)
    except ValidationError as error:
        fail(f"config file {path}, upgraded: {describe(error)}")
    text = yaml.safe_dump(upgraded, sort_keys=False, allow_unicode=True)
    for old, new in moved:
        typer.echo(f"{old} -> {new}", err=True)
    if write:
        path.write_text(text, encoding="utf-8")
        typer.echo(f"{path}: {len(moved)} key(s) renamed", err=True)
    else:
        typer.echo(text, nl=False)
