"""Signal stages as Prefect flows, run by the engine: IFD (Cherry LLM / Superfiltering),
response lengths, and any stage of the pool-stage registry (gleaner.engine.catalog)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.engine.catalog import pool_stage
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.runtime import execution_environment
from gleaner.store import Store
from gleaner.tasks.ifd.stage import IFDStage
from gleaner.tasks.length.stage import LengthStage


@flow(name="ifd", flow_run_name="ifd-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def ifd_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """L(A|Q), L(A) and IFD of every ingested example, on Ray actors holding the causal LM."""
    summary = run_stage(IFDStage(config.ifd), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, ifd=summary)
    return summary


@flow(name="length", flow_run_name="length-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def length_flow(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """Response characters and tokens of every ingested example (Long-is-more)."""
    summary = run_stage(LengthStage(config.length), config, run_id)
    record_run(Store(config.store.url, config.store.options), run_id, config, length=summary)
    return summary


@flow(name="pool-stage", flow_run_name="{name}-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def pool_stage_flow(name: str, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """A registered pool stage over the run's ingested examples (``config`` already has its
    offline roles wired: :func:`run_pool_stage`)."""
    entry = pool_stage(name)
    summary = run_stage(entry.make(config), config, run_id)
    if entry.finish is not None:  # a global step over every batch's rows (near-dup clusters)
        summary = entry.finish(config, run_id, summary)
    record_run(Store(config.store.url, config.store.options), run_id, config,
               **{name: summary})
    return summary


def run_pool_stage(name: str, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The stage's flow in one Prefect API + Ray, gleaner's server taking the roles that
    have no endpoint (what its CLI verb runs)."""
    with offline_endpoints(config, *pool_stage(name).roles) as live, \
            execution_environment(live):
        return pool_stage_flow(name=name, run_id=run_id, config=live)


def run_ifd(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The IFD flow in one Prefect API + Ray (what ``gleaner ifd`` runs)."""
    with execution_environment(config):
        return ifd_flow(run_id=run_id, config=config)


def run_length(run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The length flow in one Prefect API + Ray (what ``gleaner length`` runs)."""
    with execution_environment(config):
        return length_flow(run_id=run_id, config=config)
