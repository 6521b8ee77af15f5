"""Comparison data as a flow: K responses per prompt, graded on Ray, pairs for a reward model."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.llm.offline import offline_endpoints
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.compare.run import compare


@flow(name="compare", flow_run_name=run_name("compare"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def compare_flow(run_id: str, config: GleanerConfig,
                 responses: list[str] | None = None) -> dict[str, Any]:
    """Gather the responses, grade each 1-10 (an engine stage), write the preference pairs."""
    if not config.compare.endpoint.base_url:
        raise ValueError("compare.endpoint.base_url is not set: run_compare starts the offline "
                         "llama.cpp server, or configure an OpenAI-compatible endpoint")
    return compare(Store(config.store.url, config.store.options), run_id, config, responses)


def run_compare(config: GleanerConfig, run_id: str,
                responses: list[str] | None = None) -> dict[str, Any]:
    """The flow in one Prefect API + Ray, judged by the offline server when no judge is set."""
    with offline_endpoints(config, "grader") as live, execution_environment(live):
        return compare_flow(run_id=run_id, config=live, responses=responses)
