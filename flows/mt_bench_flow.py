"""MT-Bench for one model as a flow: two-turn answers, then the grading stage on Ray."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.store import Store
from gleaner.tasks.mtbench.run import run_mt_bench


@flow(name="mt-bench", flow_run_name=run_name("mt-bench"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def mt_bench_flow(run_id: str, config: GleanerConfig, model: str) -> dict[str, Any]:
    """``model`` (a fine-tuned name of the run, ``base``, a folder, an HF id) on MT-Bench."""
    store = Store(config.store.url, config.store.options)
    with offline_endpoints(config, "judge") as live:
        summary = run_mt_bench(store, run_id, live, model)
    if not summary["reused"]:
        record_run(store, run_id, config, mt_bench={summary["model"]: {
            k: summary[k] for k in ("overall", "turns", "graded", "failed")}})
    return summary
