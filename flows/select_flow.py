"""Selection as a Prefect flow: the global step (gleaner.engine.step), its report an artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from gleaner.config import GleanerConfig
from gleaner.engine.step import run_step
from gleaner.runtime import prefect_api, resolve_prefect_api
from gleaner.store import Store
from gleaner.tasks.select.publish import export_curated
from gleaner.tasks.select.stage import SelectStep


@flow(name="deita-select", flow_run_name="select-{run_id}", validate_parameters=False)
def select_flow(run_id: str, config: GleanerConfig, out: str | None = None,
                fmt: str | None = None, size_of: str | None = None, force: bool = False
                ) -> dict[str, Any]:
    """Select (a step: a rerun with the same settings and inputs is done), write manifest,
    curated examples and report; export the curated set when ``out`` is given."""
    store = Store(config.store.url, config.store.options)
    summary = run_step(store, run_id, SelectStep(store, run_id, config, size_of),
                       force=force)
    if out:
        summary["export"] = export_curated(store, run_id, out, fmt)
    get_run_logger().info("selected %d of %d examples (%s)%s", summary["selected"],
                          summary["examples"],
                          ", ".join(f"{k} {v}" for k, v in summary["reasons"].items()),
                          " (already done; reused)" if summary["reused"] else "")
    return summary


def run_select(store: Store, run_id: str, config: GleanerConfig, out: str | None = None,
               fmt: str | None = None, size_of: str | None = None, force: bool = False
               ) -> dict[str, Any]:
    # Selection runs in this process (numpy); it needs the Prefect API, not Ray.
    with prefect_api(resolve_prefect_api(config)):
        return select_flow(run_id=run_id, config=config, out=out, fmt=fmt, size_of=size_of,
                           force=force)
