"""``gleaner preferences``: comparison pairs or pairwise verdicts out as preference data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    StoreOption,
    app,
    build_config,
    choice,
    emit,
    fail,
    run_or_fail,
)


def publish_and_export(store: Any, run_id: str, name: str, origin: str,
                       comparison: str | None, out: str | None, fmt: str | None,
                       storage_options: dict[str, Any]) -> dict[str, Any]:
    from gleaner.tasks.publish.export import write_dataset
    from gleaner.tasks.publish.preferences import publish_preferences
    from gleaner.tasks.publish.versions import read_version

    version = publish_preferences(store, run_id, name, origin, comparison)
    summary: dict[str, Any] = {"run_id": run_id, "from": origin, "dataset": version}
    if out:
        summary["export"] = write_dataset(read_version(store, name, version["version"]), out,
                                          fmt, storage_options)
    return summary


@app.command("preferences")
def preferences(
    run_id: str = typer.Option(..., "--run-id", help="The run whose pairs or verdicts to use."),
    origin: str = typer.Option(
        "compare", "--from", help="compare: the run's comparison pairs (gleaner compare); "
        "verdicts: a pairwise evaluation's verdicts (the winner's answer chosen)."),
    comparison: str | None = typer.Option(
        None, "--comparison", help="verdicts: which evaluation (e.g. curated-vs-baseline; "
        "needed when the run holds several)."),
    name: str | None = typer.Option(
        None, "--name", help="The dataset to publish a version of (default: "
        "<curate.dataset_name>-preferences)."),
    out: str | None = typer.Option(None, "--out", help="Also write the version here."),
    fmt: str | None = typer.Option(None, "--format",
                                   help="jsonl | parquet | hf (default: from --out)."),
    store: str | None = StoreOption,
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Publish preference data (prompt, chosen, rejected, margin, source: what TRL's DPO and
    reward trainers read) as a dataset version; `gleaner dpo train --preferences NAME`."""
    choice("export_format", fmt, "--format")
    if fmt in ("alpaca", "sharegpt"):
        fail(f"--format {fmt} holds instructions, not preference pairs: jsonl, parquet or hf")
    config = build_config(config_file, **{"store.url": store})
    from gleaner.store import Store

    st = Store(config.store.url, config.store.options)
    summary = run_or_fail(publish_and_export, st, run_id,
                          name or f"{config.curate.dataset_name}-preferences", origin,
                          comparison, out, fmt, config.store.options)
    version = summary["dataset"]
    text = (f"run {run_id}: {version['counts']['examples']:,} preference pairs from {origin} "
            f"published as {version['name']} {version['label']} ({version['uri']})")
    if summary.get("export"):
        text += (f"\nwrote {summary['export']['rows']:,} pairs to {summary['export']['path']}")
    emit(summary, as_json, text)
