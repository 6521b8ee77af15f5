"""Every command and subcommand prints its help: an option's text that the terminal renderer
cannot read (rich markup such as ``[/id]``) would crash ``--help`` for that command."""

from __future__ import annotations

from typing import Any

import typer.main
from typer.testing import CliRunner

from gleaner.flows.cli import app


def command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in (getattr(group, "commands", None) or {}).items():
        paths += command_paths(command, (*prefix, name))
    return paths


def test_every_command_prints_its_help() -> None:
    paths = command_paths(typer.main.get_command(app))
    assert len(paths) > 20  # the subcommands are there to check
    runner = CliRunner()
    broken = {}
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        if result.exit_code != 0 or "Usage" not in result.output:
            broken[" ".join(path)] = repr(result.exception) or result.output[-300:]
    assert not broken


def test_help_lists_the_verbs_grouped_in_the_order_a_user_meets_them() -> None:
    import re

    from gleaner.flows.cli_app import LIFECYCLE, lifecycle

    result = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    panels = re.findall(r"─ ([A-Z][a-z ]+?) ─", result.output)
    assert panels == ["Options", *LIFECYCLE]
    listed = re.findall(r"^│ ([a-z][a-z-]*) ", result.output, re.M)
    assert listed == [verb for verbs in lifecycle().values() for verb in verbs]
    assert listed[:2] == ["ingest", "generate"] and listed[-2:] == ["doctor", "config"]
