"""Making data as Prefect flows: Alpaca's self-instruct, and a teacher's regeneration (SPEC §8).

``self_instruct_flow`` grows a run's pool in rounds on the driver (gleaner.engine.rounds: one
async batch of requests per round, each round a part) and leaves the kept tasks as the run's
``ingest``; ``regenerate_flow`` runs the teacher stage on the engine (batches as Prefect
tasks on Ray) and writes the chosen responses as another run's ``ingest``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner import layout
from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import record_run
from gleaner.runtime import execution_environment, init_ray, prefect_api, resolve_prefect_api
from gleaner.store import Store
from gleaner.tasks.generate.regenerate import RegenerateStage
from gleaner.tasks.generate.selfinstruct import run_self_instruct
from gleaner.tasks.generate.training_run import export_answer_files, write_training_run


@flow(name="generate-self-instruct", flow_run_name=run_name("generate"),
      validate_parameters=False)
def self_instruct_flow(run_id: str, config: GleanerConfig, seeds: str, count: int
                       ) -> dict[str, Any]:
    """Self-instruct from ``seeds`` until ``count`` tasks are kept; they become the ingest."""
    summary = run_self_instruct(config, run_id, seeds, count)
    store = Store(config.store.url, config.store.options)
    ingest = store.read_json(layout.summary_path(store, run_id, layout.INGEST))
    record_run(store, run_id, config, generate=summary, ingest=ingest)
    return summary


@flow(name="regenerate", flow_run_name=run_name("regenerate"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def regenerate_flow(run_id: str, config: GleanerConfig, into: str | None = None,
                    answers_out: str | None = None) -> dict[str, Any]:
    """The teacher answers every example of ``run_id``; ``into`` gets the chosen responses."""
    store = Store(config.store.url, config.store.options)
    summary = run_stage(RegenerateStage(config.regenerate), config, run_id)
    if into:
        into_summary = write_training_run(store, run_id, into, config.regenerate.keep,
                                          config.ingest.batch_rows)
        record_run(store, into, config, ingest=into_summary)
        summary["into"] = {k: into_summary[k] for k in ("run_id", "read", "kept",
                                                        "quarantined", "duplicates", "reasons",
                                                        "keep", "output")}
    if answers_out:
        summary["answers"] = export_answer_files(store, run_id, answers_out,
                                                 config.store.options)
    record_run(store, run_id, config, regenerate=summary)
    return summary


@contextlib.contextmanager
def _rounds_environment(config: GleanerConfig) -> Iterator[None]:
    """Rounds run on the driver: Ray only for the cluster-wide limiter (rpm/tpm given)."""
    with prefect_api(resolve_prefect_api(config)):
        endpoint = config.generate.endpoint
        if endpoint.rpm or endpoint.tpm:
            init_ray(config)
        yield


def run_generate(config: GleanerConfig, run_id: str, seeds: str, count: int) -> dict[str, Any]:
    """The self-instruct flow, on the offline server when no endpoint is set."""
    with offline_endpoints(config, "generator") as live, _rounds_environment(live):
        return self_instruct_flow(run_id=run_id, config=live, seeds=seeds, count=count)


def run_regenerate(config: GleanerConfig, run_id: str, into: str | None = None,
                   answers_out: str | None = None) -> dict[str, Any]:
    """The regenerate flow in one Prefect API + Ray, on the offline server without endpoint."""
    with offline_endpoints(config, "teacher") as live, execution_environment(live):
        return regenerate_flow(run_id=run_id, config=live, into=into, answers_out=answers_out)
