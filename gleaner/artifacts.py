"""Names people see in Prefect: artifact keys and flow-run names, one rule for every flow."""

from __future__ import annotations

import re


def artifact_key(*parts: str) -> str:
    """``artifact_key("rate", "summary", run_id)`` -> ``rate-summary-<run id>``, Prefect-safe."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def run_name(stage: str):  # noqa: ANN201 (a Prefect flow_run_name callable)
    """``flow_run_name`` for a stage's flow: ``<stage>-<run id>``, whatever the flow was given.

    The run id comes from the ``run_id`` parameter, else from the config's; a flow started
    without either gets the flow run's own short id, never Prefect's random name.
    """

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters or {}
        config = parameters.get("config")
        run_id = parameters.get("run_id") or getattr(config, "run_id", None) or (
            config.get("run_id") if isinstance(config, dict) else None)
        return f"{stage}-{run_id or str(flow_run.id)[:8]}"

    return name


def flow_run_url(api_url: str | None, flow_run_id: str | None) -> str | None:
    """Where a person opens a flow run in the Prefect UI (the API URL without ``/api``)."""
    if not api_url or not flow_run_id:
        return None
    base = api_url.rstrip("/").removesuffix("/api")
    return f"{base}/runs/flow-run/{flow_run_id}"
