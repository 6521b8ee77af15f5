"""``gleaner doctor``: check this machine and the config's services before a first run."""

from __future__ import annotations

from pathlib import Path

import typer

from gleaner.flows.cli_app import ConfigOption, JsonOption, StoreOption, app, build_config, emit


@app.command("doctor")
def doctor(
    config_file: Path | None = ConfigOption,
    store: str | None = StoreOption,
    refresh_llama: bool = typer.Option(
        False, "--refresh-llama", help="Prove the llama.cpp CPU variants again (a real decode) "
        "instead of using the choice cached for this machine."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Python and packages, llama.cpp, Prefect, Ray, the store, endpoints and test sets.

    Each line is ok, warning or FAILED with what to do; the exit code is 1 when something
    a run with this config needs is broken.
    """
    from gleaner.flows.doctor import exit_code, format_checks, run_checks

    config = build_config(config_file, check_store=False, **{"store.url": store})
    checks = run_checks(config, refresh_llama=refresh_llama)
    code = exit_code(checks)
    emit({"checks": [c.as_dict() for c in checks], "ok": code == 0}, as_json,
         format_checks(checks))
    raise typer.Exit(code)
