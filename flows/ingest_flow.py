"""The ingest stage as a Prefect flow (later extended into the full curate flow).

The work is :func:`tasks.ingest.run_ingest`, a plain function; this module
wraps it as one Prefect task (the whole ingest is one unit: it streams, so it
is cheap to redo, and an interrupted attempt is redone from scratch) and
publishes the summary as an artifact a person can read in the Prefect UI.
The curate flow calls :func:`ingest_flow` as a subflow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from gleaner.artifacts import artifact_key as shared_artifact_key
from gleaner.config import GleanerConfig
from gleaner.runs import new_run_id
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import run_ingest


@task(name="ingest-sources", retries=0)
def ingest_sources(
    sources: list[str], run_id: str, config: GleanerConfig, force: bool = False
) -> dict[str, Any]:
    store = Store(config.store.url, config.store.options)
    return run_ingest(sources, store, run_id, config, force=force)


def artifact_key(run_id: str) -> str:
    return shared_artifact_key("ingest", run_id)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Ingest {summary['run_id']}",
        "",
        f"read **{summary['read']:,}** = kept **{summary['kept']:,}** + quarantined "
        f"**{summary['quarantined']:,}** + duplicates **{summary['duplicates']:,}**",
        "",
        "| source | format | read | kept | quarantined | duplicates |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary["sources"]:
        lines.append(
            f"| {s['source']} | {s['format'] or '?'} | {s['read']:,} | {s['kept']:,} | "
            f"{s['quarantined']:,} | {s['duplicates']:,} |"
        )
    if summary["reasons"]:
        lines += ["", "| quarantine reason | rows |", "|---|---:|"]
        lines += [f"| {code} | {n:,} |" for code, n in summary["reasons"].items()]
        lines += ["", f"Quarantine rows: `{summary['quarantine_output']}`"]
    lines += ["", f"Examples: `{summary['output']}` ({summary['parts']} parts)"]
    return "\n".join(lines)


@flow(name="ingest")
def ingest_flow(
    sources: list[str],
    run_id: str | None = None,
    config: GleanerConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest sources into the store of ``config``; returns the summary (also in run.json)."""
    config = config or GleanerConfig()
    run_id = run_id or config.run_id or new_run_id()
    summary = ingest_sources(list(sources), run_id, config, force)
    create_markdown_artifact(
        key=artifact_key(run_id),
        markdown=summary_markdown(summary),
        description=f"ingest summary of run {run_id}",
    )
    return summary
