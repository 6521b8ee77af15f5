"""Pairwise evaluation as a flow: both models answer, the judge stage runs on Ray, W/T/L.

The deployable entry point (``flows/evaluate_flow.py:evaluate_flow``): model A
(the curated one) against model B (the baseline), or two answer files; each
model's answering is a Prefect task run, each test set's judging an engine
stage (its batches Prefect task runs on Ray); the report is published as
artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import new_run_id
from gleaner.store import Store
from gleaner.tasks.evaluate.eval_sets import EvalPrompt
from gleaner.tasks.evaluate.run import (
    answer_task,
    label_of,
    publish_artifacts,
    run_evaluate,
    run_evaluate_answers,
)


@flow(name="evaluate", flow_run_name=run_name("evaluate"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def evaluate_flow(run_id: str | None = None, config: GleanerConfig | None = None,
                  model_a: str | None = None, model_b: str | None = None,
                  answers_a: str | None = None, answers_b: str | None = None,
                  test_sets: list[str] | None = None, limit: int | None = None,
                  rule: str | None = None) -> dict[str, Any]:
    """Compare model A (the curated one) with model B, or two answer files; publish the report."""
    config = config or GleanerConfig()
    run_id = run_id or config.run_id or new_run_id()
    store = Store(config.store.url, config.store.options)

    def answer_fn(reference: str, prompts: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
        named = answer_task.with_options(task_run_name=f"answer-{label_of(reference)}")
        return named(run_id, config, reference, prompts)

    if (answers_a is None) != (answers_b is None):
        raise ValueError("judging answer files needs both --answers-a and --answers-b")
    with offline_endpoints(config, "judge") as live:
        if answers_a and answers_b:
            summary = run_evaluate_answers(store, run_id, live, answers_a, answers_b, rule, limit)
        else:
            summary = run_evaluate(store, run_id, live, model_a, model_b, test_sets, limit, rule,
                                   answer_fn=answer_fn)
    if not summary.get("reused"):
        publish_artifacts(store, summary)
    return summary
