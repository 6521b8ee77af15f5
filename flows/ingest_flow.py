"""The ingest stage as a Prefect flow: one task (streaming readers), a step of the engine."""

from __future__ import annotations

from typing import Any

from prefect import flow

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.runs import new_run_id
from gleaner.tasks.ingest.ingest import ingest_task


@flow(name="ingest", flow_run_name=run_name("ingest"), validate_parameters=False)
def ingest_flow(
    sources: list[str],
    run_id: str | None = None,
    config: GleanerConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest sources into the store of ``config``; returns the summary (also in run.json)."""
    config = config or GleanerConfig()
    run_id = run_id or config.run_id or new_run_id()
    return ingest_task(list(sources), run_id, config, force)
