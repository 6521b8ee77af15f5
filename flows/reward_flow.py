"""The reward model as flows: training on Ray Train, then scoring every example on the engine."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import artifact_key, run_name
from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.engine.step import publish_markdown
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.reward.stage import RewardStage
from gleaner.tasks.reward.train import reward_train_task, summary_markdown


@flow(name="reward-train", flow_run_name=run_name("reward-train"), validate_parameters=False)
def reward_train_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Train the reward model on the run's comparison pairs; publish its report."""
    summary = reward_train_task(run_id, config)
    publish_markdown(artifact_key("reward-model", run_id), summary_markdown(summary),
                     f"reward model of run {run_id}")
    return summary


@flow(name="reward-score", flow_run_name=run_name("reward-score"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def reward_score_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """r(x, y) of every ingested example, on a pool of Ray actors holding the reward model."""
    summary = run_stage(RewardStage(config.reward, config.store, run_id), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, reward=summary)
    return summary


def run_reward_train(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    with execution_environment(config):
        return reward_train_flow(run_id=run_id, config=config)


def run_reward_score(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    with execution_environment(config):
        return reward_score_flow(run_id=run_id, config=config)
