"""The curate flow: ingest → rate → (score, embed) → select → dataset version → finetune, evaluate.

Every stage is a subflow of one ``curate`` flow run, named after the run, so the
Prefect UI shows the whole refresh in one place; every stage resumes from what
the store holds. When selection completes the flow publishes a dataset version
and emits ``gleaner.selection.completed``; in the embedded default it then runs
fine-tuning and evaluation itself, with ``curate.downstream: event`` the
deployment triggers in prefect.yaml start them on their own work pools.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig, resolve_config
from gleaner.engine.catalog import pool_stage
from gleaner.flows.deita_flow import embed_flow, score_flow
from gleaner.flows.evaluate_flow import evaluate_flow
from gleaner.flows.finetune_flow import finetune_flow
from gleaner.flows.ingest_flow import ingest_flow
from gleaner.flows.rate_flow import rate_flow
from gleaner.flows.select_flow import select_flow
from gleaner.flows.signal_flows import pool_stage_flow
from gleaner.llm.offline import offline_endpoints
from gleaner.runs import new_run_id, record_run
from gleaner.runtime import init_ray
from gleaner.store import Store
from gleaner.tasks.cost.plan import plan_run
from gleaner.tasks.cost.report import actual_cost, check_budget, keep_plan
from gleaner.tasks.evaluate.eval_sets import check_evaluation_inputs
from gleaner.tasks.publish.approval import (
    approval_gate,
    not_published_state,
    publish_lock,
)
from gleaner.tasks.publish.release import previous_run, release
from gleaner.tasks.select.marks import check_pool_left


@flow(name="curate", flow_run_name=run_name("curate"), validate_parameters=False)
def curate_flow(
    sources: list[str],
    store: str | None = None,
    config: str | dict[str, Any] | GleanerConfig | None = None,
    run_id: str | None = None,
    train: bool | None = None,
    evaluate: bool | None = None,
    cost_plan: dict[str, Any] | None = None,
    approve_cost: bool = False,
) -> dict[str, Any]:
    """Curate ``sources`` into a new dataset version; fine-tune and evaluate when asked."""
    cfg = resolve_config(config, store).with_overrides(
        {"curate.train": train, "curate.evaluate": evaluate})
    run_id = run_id or cfg.run_id or new_run_id()
    cfg = cfg.with_overrides({"run_id": run_id})
    check_evaluation_inputs(cfg)
    # One Ray for every stage: a deployment run by a worker has no CLI to start it, and
    # RayTaskRunner's own ray.init() would join whatever cluster /tmp/ray last named.
    init_ray(cfg)
    st = Store(cfg.store.url, cfg.store.options)
    before = previous_run(st, cfg.curate.dataset_name, run_id)
    record_run(st, run_id, cfg, flow="curate", sources=list(sources))
    summary: dict[str, Any] = {"run_id": run_id, "store": cfg.store.url,
                               "flow_run_id": str(flow_run.id)}
    summary["ingest"] = ingest_flow(list(sources), run_id=run_id, config=cfg)
    plan = cost_plan or plan_run(st, run_id, cfg)  # before anything is spent
    check_budget(plan, approved=approve_cost)
    keep_plan(st, run_id, plan)
    for name in cfg.curate.filters:  # marks what selection leaves out (test-set overlap)
        summary[name] = pool_stage_flow(name=name, run_id=run_id, config=cfg)
    check_pool_left(st, run_id, cfg)  # every example marked: stop before anything is spent
    downstream = cfg.curate.downstream == "subflow"
    roles = ["rater", "judge"] if downstream and cfg.curate.evaluate else ["rater"]
    roles += [role for name in cfg.curate.signals for role in pool_stage(name).roles]
    with offline_endpoints(cfg, *roles) as live:
        summary["rate"] = rate_flow(run_id=run_id, config=live)
        summary["score"] = score_flow(run_id=run_id, config=live)
        summary["embed"] = embed_flow(run_id=run_id, config=live)
        for name in cfg.curate.signals:
            summary[name] = pool_stage_flow(name=name, run_id=run_id, config=live)
        summary["select"] = select_flow(run_id=run_id, config=live)
        # publish.approval: required: wait for a person (paused, or suspended off the worker)
        decision = approval_gate(live, run_id, summary, actual_cost(st, run_id, plan))
        publish = decision is None or decision["state"] == "approved"
        if decision is not None:
            summary["approval"] = decision
        if publish:
            with publish_lock(st, cfg.curate.dataset_name, run_id):  # one publish at a time
                summary.update(release(live, run_id, summary, before))
        if publish and downstream and cfg.curate.train:
            summary["finetune"] = finetune_flow(run_id=run_id, config=live)
        if publish and downstream and cfg.curate.evaluate:
            summary["evaluate"] = evaluate_flow(run_id=run_id, config=live)
    summary["cost"] = actual_cost(st, run_id, plan)
    record_run(st, run_id, cfg, curate={k: v for k, v in summary.items() if k != "store"})
    return summary if publish else not_published_state(summary)
