"""DPO as a flow: the policy trained on the run's comparison pairs, on Ray Train."""

from __future__ import annotations

from typing import Any

from prefect import flow

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.runtime import execution_environment
from gleaner.tasks.dpo.train import dpo_train_task


@flow(name="dpo-train", flow_run_name=run_name("dpo-train"), validate_parameters=False)
def dpo_train_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Train the DPO policy on the run's comparison pairs."""
    return dpo_train_task(run_id, config)


def run_dpo_train(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    with execution_environment(config):
        return dpo_train_flow(run_id=run_id, config=config)
