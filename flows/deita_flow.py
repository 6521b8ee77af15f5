"""DEITA's batched stages as Prefect flows: scores and embeddings, run by the engine on Ray."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.deita.stages import EmbedStage, score_stage


@flow(name="deita-score", flow_run_name="score-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def score_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Complexity and quality scores (and evol) for every ingested example of the run."""
    summary = run_stage(score_stage(config.score), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, score=summary)
    return summary


@flow(name="deita-embed", flow_run_name="embed-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def embed_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Embeddings of every ingested example on a pool of Ray actors holding the encoder."""
    summary = run_stage(EmbedStage(config.embed), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, embed=summary)
    return summary


def run_score(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The score flow in one Prefect API + Ray (what ``gleaner score`` runs)."""
    with execution_environment(config):
        return score_flow(run_id=run_id, config=config)


def run_embed(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The embed flow in one Prefect API + Ray (what ``gleaner embed`` runs)."""
    with execution_environment(config):
        return embed_flow(run_id=run_id, config=config)
