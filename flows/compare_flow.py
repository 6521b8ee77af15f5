"""Comparison data as a flow: K responses per prompt, graded on Ray, pairs for a reward model."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import artifact_key, run_name
from gleaner.config import GleanerConfig
from gleaner.engine.step import publish_markdown
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.compare.run import (
    gather_responses,
    grade_responses,
    make_pairs,
    summary_markdown,
)


@flow(name="compare", flow_run_name=run_name("compare"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def compare_flow(run_id: str, config: GleanerConfig,
                 responses: list[str] | None = None) -> dict[str, Any]:
    """Gather the responses, grade each 1-10 (an engine stage), write the preference pairs."""
    if not config.compare.endpoint.base_url:
        raise ValueError("compare.endpoint.base_url is not set: run_compare starts the offline "
                         "llama.cpp server, or configure an OpenAI-compatible endpoint")
    store = Store(config.store.url, config.store.options)
    gathered = gather_responses(store, run_id, config, responses, config.compare.limit)
    grading = grade_responses(config, run_id, gathered.table.num_rows)
    summary = make_pairs(store, run_id, config, gathered, grading)
    record_run(store, run_id, config, compare={k: summary[k] for k in (
        "prompts", "responses", "scored", "failed", "pairs", "ties_skipped", "pairs_path")})
    publish_markdown(artifact_key("compare", "pairs", run_id), summary_markdown(summary),
                     f"comparison data of run {run_id}")
    return summary


def run_compare(config: GleanerConfig, run_id: str,
                responses: list[str] | None = None) -> dict[str, Any]:
    """The flow in one Prefect API + Ray, judged by the offline server when no judge is set."""
    with offline_endpoints(config, "grader") as live, execution_environment(live):
        return compare_flow(run_id=run_id, config=live, responses=responses)
