"""``gleaner config upgrade FILE``: a config file with every renamed key under its new name."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import typer
from ruamel.yaml import YAML

from gleaner.flows.cli_app import app, fail

config_app = typer.Typer(help="Config files: upgrade renamed keys.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("upgrade")
def upgrade(
    path: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="A gleaner YAML config, or a prefect.yaml."),
    write: bool = typer.Option(False, "--write", help="Rewrite the file in place."),
) -> None:
    """Print (or --write) the file with renamed keys under their new names, comments kept;
    it must then validate. In a prefect.yaml, every deployment's config in its parameters
    is upgraded (deploy again to send them to the server)."""
    from pydantic import ValidationError

    from gleaner.config import GleanerConfig, describe, upgrade_document

    yaml = YAML()  # round-trip: comments and key order stay
    yaml.preserve_quotes = True
    document = yaml.load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        fail(f"config file {path} must hold a mapping at the top level")
    moved: list[tuple[str, str]] = []

    def upgraded(config: dict[str, Any]) -> dict[str, Any]:
        new, renamed = upgrade_document(config)  # a copy, comments and all
        try:
            GleanerConfig.model_validate(new)
        except ValidationError as error:
            fail(f"config file {path}, upgraded: {describe(error)}")
        moved.extend(renamed)
        return new

    if "deployments" in document:  # a prefect.yaml: each deployment's config parameter
        for parameters in deployment_parameters(document):
            parameters["config"] = upgraded(parameters["config"])
    else:
        document = upgraded(document)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    for old, new in moved:
        typer.echo(f"{old} -> {new}", err=True)
    if write and moved:
        path.write_text(buffer.getvalue(), encoding="utf-8")
        typer.echo(f"{path}: {len(moved)} key(s) renamed", err=True)
    else:
        typer.echo(buffer.getvalue(), nl=False)


def deployment_parameters(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameters of a prefect.yaml's deployments that carry a config mapping (a path
    there names a file: upgrade that file itself)."""
    return [d["parameters"] for d in document.get("deployments") or []
            if isinstance(d.get("parameters"), dict)
            and isinstance(d["parameters"].get("config"), dict)]
