"""Selection as a Prefect flow: the global step, its report published as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from gleaner.config import GleanerConfig
from gleaner.runs import record_run
from gleaner.runtime import prefect_api, resolve_prefect_api
from gleaner.store import Store
from gleaner.tasks.select.publish import export_curated, publish_report
from gleaner.tasks.select.stage import select_examples


@flow(name="deita-select", flow_run_name="select-{run_id}", validate_parameters=False)
def select_flow(run_id: str, config: GleanerConfig, out: str | None = None,
                fmt: str | None = None, size_of: str | None = None) -> dict[str, Any]:
    """Select, write manifest + curated examples + report, publish the report as artifacts."""
    store = Store(config.store.url, config.store.options)
    summary, report, paths = select_examples(store, run_id, config, size_of)
    if out:
        summary["export"] = export_curated(store, run_id, out, fmt)
    publish_report(run_id, store, report, paths)
    get_run_logger().info("selected %d of %d examples (%s)", summary["selected"],
                          summary["examples"],
                          ", ".join(f"{k} {v}" for k, v in report.counts.items()))
    record_run(store, run_id, config, select=summary)
    return summary


def run_select(store: Store, run_id: str, config: GleanerConfig, out: str | None = None,
               fmt: str | None = None, size_of: str | None = None) -> dict[str, Any]:
    # Selection runs in this process (numpy); it needs the Prefect API, not Ray.
    with prefect_api(resolve_prefect_api(config)):
        return select_flow(run_id=run_id, config=config, out=out, fmt=fmt, size_of=size_of)
