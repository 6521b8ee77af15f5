"""DEITA's EVOL data and scorers as flows: chains on the engine, items, a trained scorer."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import artifact_key, run_name
from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.engine.step import publish_markdown
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.evol.items import write_items
from gleaner.tasks.evol.scorer import report_markdown, scorer_train_task
from gleaner.tasks.evol.stage import EvolStage


def _artifact(markdown: str, key: str, description: str) -> None:
    publish_markdown(key, markdown, description)


@flow(name="evol", flow_run_name=run_name("evol"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def evol_flow(run_id: str, config: GleanerConfig, kind: str) -> dict[str, Any]:
    """EVOL chains of every seed (rewrites, one ranking), then their (text, score) items."""
    if not config.evol.endpoint.base_url:
        raise ValueError("evol.endpoint.base_url is not set: run_evol starts the offline "
                         "llama.cpp server, or configure an OpenAI-compatible endpoint")
    store = Store(config.store.url, config.store.options)
    summary = run_stage(EvolStage(config.evol, kind), config, run_id)  # type: ignore[arg-type]
    summary.update(write_items(store, run_id, kind))
    record_run(store, run_id, config, **{f"evol_{kind}": {k: summary[k] for k in (
        "seeds", "chains_ok", "chains_failed", "items", "items_path")}})
    return summary


@flow(name="scorer-train", flow_run_name=run_name("scorer-train"), validate_parameters=False)
def scorer_train_flow(run_id: str, config: GleanerConfig, kind: str) -> dict[str, Any]:
    """Fine-tune a DEITA scorer on the run's EVOL items; report it against its teacher."""
    result = scorer_train_task(run_id, config, kind)
    _artifact(report_markdown(result), artifact_key("scorer", kind, run_id),
              f"DEITA {kind} scorer of run {run_id}")
    return result


def run_evol(config: GleanerConfig, run_id: str, kind: str) -> dict[str, Any]:
    """The EVOL flow in one Prefect API + Ray; the offline server rewrites when none is set."""
    with offline_endpoints(config, "rewriter") as live, execution_environment(live):
        return evol_flow(run_id=run_id, config=live, kind=kind)


def run_scorer_train(config: GleanerConfig, run_id: str, kind: str) -> dict[str, Any]:
    with execution_environment(config):
        return scorer_train_flow(run_id=run_id, config=config, kind=kind)
