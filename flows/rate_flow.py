"""The rating stage as a Prefect flow: the engine runs RateStage, batches as tasks on Ray."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.rate.stage import RateStage


@flow(name="rate", flow_run_name="rate-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def rate_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Rate every ingested example of ``run_id`` (AlpaGasus); returns the stage summary."""
    if not config.rate.endpoint.base_url:
        raise ValueError("rate.endpoint.base_url is not set: run_rate starts the offline "
                         "llama.cpp server, or configure an OpenAI-compatible endpoint")
    summary = run_stage(RateStage(config.rate), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, rate=summary)
    return summary


def run_rate(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """The flow in one Prefect API + Ray, on the offline server when no endpoint is set."""
    with offline_endpoints(config, "rater") as live, execution_environment(live):
        return rate_flow(run_id=run_id, config=live)
