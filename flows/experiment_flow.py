"""The experiment grid as one Prefect flow run: the pool's stages once, then one subflow per arm.

    experiment ─ ingest (when the pool is sources) ─ cost plan + budget guard
               ─ pool stages the arms read (rate / score / embed / ifd / length / reward)
               ─ selections: a manifest and a dataset version per distinct selection
               ─ arm <baseline> ─ arm <a> ─ arm <b> ...   (fine-tune, answers, judge, MT-Bench)
               ─ the table and the plot (store + artifacts)

An arm's subflow is retried alone (``experiment.arm_retries``); one that still
fails is reported as failed and the others go on (without a baseline there is
nothing to judge against: the rest are skipped). Every step resumes from the
store, so a rerun of the same command redoes only unfinished arms and unjudged
pairs. Plain steps live in gleaner.tasks.experiment.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect_ray import RayTaskRunner

from gleaner import layout
from gleaner.artifacts import run_name
from gleaner.config import GleanerConfig, resolve_config
from gleaner.engine import read_summary
from gleaner.engine.catalog import pool_stages
from gleaner.engine.step import run_step
from gleaner.flows.deita_flow import embed_flow, score_flow
from gleaner.flows.ingest_flow import ingest_flow
from gleaner.flows.rate_flow import rate_flow
from gleaner.flows.reward_flow import reward_score_flow
from gleaner.flows.signal_flows import ifd_flow, length_flow, pool_stage_flow
from gleaner.llm.offline import offline_endpoints
from gleaner.runtime import init_ray
from gleaner.store import Store
from gleaner.tasks.evaluate.eval_sets import check_readable
from gleaner.tasks.experiment import budget, steps, table
from gleaner.tasks.experiment.arms import Selection, plan_selections
from gleaner.tasks.experiment.pool import pool_run, signals_cost
from gleaner.tasks.experiment.selection import select_all
from gleaner.tasks.mtbench.run import run_mt_bench

# How the grid makes a pool stage an arm reads (a stage without a flow here must be in the pool).
POOL_FLOWS = {layout.RATE: rate_flow, layout.SCORE: score_flow, layout.EMBED: embed_flow,
              layout.IFD: ifd_flow, layout.LENGTH: length_flow, layout.REWARD: reward_score_flow}


def experiment_run_id(config: GleanerConfig, run_id: str | None) -> str:
    """The same command resumes the same run: ``experiment-<name>`` unless told otherwise."""
    return run_id or config.run_id or f"experiment-{config.experiment.name}"


@flow(name="experiment", flow_run_name=run_name("experiment"), task_runner=RayTaskRunner(),
      validate_parameters=False)
def experiment_flow(config: str | dict[str, Any] | GleanerConfig | None = None,
                    run_id: str | None = None, approved: bool = False) -> dict[str, Any]:
    """Select, fine-tune and judge every arm of ``config.experiment``; returns the grid."""
    cfg = resolve_config(config)
    run_id = experiment_run_id(cfg, run_id)
    cfg = cfg.with_overrides({"run_id": run_id})
    check_readable(cfg.evaluate.test_sets, cfg.evaluate.test_sets_dir)
    init_ray(cfg)
    store = Store(cfg.store.url, cfg.store.options)
    pool = pool_run(cfg, run_id)
    if cfg.experiment.pool.sources:
        ingest_flow(list(cfg.experiment.pool.sources), run_id=run_id, config=cfg)
    plan = budget.experiment_plan(store, run_id, cfg)
    budget.announce(store, run_id, plan)
    budget.check_guard(plan, approved)
    selections = plan_selections(cfg, pool)
    roles = ["rater", "judge"] if layout.RATE in plan["pool_stages"] else ["judge"]
    roles += [role for stage in plan["pool_stages"] if stage in pool_stages()
              for role in pool_stages()[stage].roles]
    with offline_endpoints(cfg, *roles) as live:
        summaries = {stage: pool_stage(store, pool, live, stage) for stage in plan["pool_stages"]}
        chosen = select_all(run_id, live, selections)
        arms = run_arms(run_id, live, selections, chosen, summaries)
    grid = {**table.grid_result(run_id, cfg, pool, arms), "flow_run_id": str(flow_run.id)}
    result = table.write_result(store, run_id, grid)
    table.publish(store, run_id, result)
    if result["failed_arms"]:
        raise steps.ArmsFailed(result)
    return result


def pool_stage(store: Store, pool: str, config: GleanerConfig, stage: str) -> dict[str, Any]:
    """One pool stage an arm reads, run by its flow (resumed, cached), or as the pool has it."""
    if stage in POOL_FLOWS:
        return POOL_FLOWS[stage](run_id=pool, config=config)
    if stage in pool_stages():
        return pool_stage_flow(name=stage, run_id=pool, config=config)
    summary = read_summary(store, pool, stage)
    if summary is None:
        raise ValueError(f"an arm reads stage {stage!r}, which run {pool!r} does not hold and "
                         "the experiment does not know how to make: run it first")
    return summary


def run_arms(run_id: str, config: GleanerConfig, selections: list[Selection],
             chosen: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """Every arm's subflow, the baseline first; a failed arm is reported, the rest go on."""
    baseline = next(s for s in selections if s.baseline)
    by_arm = {arm: s for s in selections for arm in s.arms}
    order = baseline.arms + [a.name for a in config.experiment.arms if a.name not in baseline.arms]
    results: list[dict[str, Any]] = []
    for arm in order:
        selection = by_arm[arm]
        if results and results[0]["status"] != "ok" and not selection.baseline:
            results.append({"arm": arm, "status": "skipped", "error": "the baseline arm failed"})
            continue
        subflow = arm_flow.with_options(flow_run_name=f"arm-{arm}-{run_id}",
                                        retries=config.experiment.arm_retries)
        try:
            results.append(subflow(run_id=run_id, config=config, arm=arm, selection=selection,
                                   baseline=baseline, chosen=chosen[selection.name],
                                   signals_usd=signals_cost(selection, summaries, config)))
        except Exception as error:  # after its retries: reported, and the grid goes on
            results.append({"arm": arm, "status": "failed",
                            "error": f"{type(error).__name__}: {error}"[:600]})
    return results


@flow(name="experiment-arm", task_runner=RayTaskRunner(), validate_parameters=False)
def arm_flow(run_id: str, config: GleanerConfig, arm: str, selection: Selection,
             baseline: Selection, chosen: dict[str, Any], signals_usd: float | None
             ) -> dict[str, Any]:
    """One arm: its model (same recipe and seed as every arm), its answers, its verdicts.

    A step (gleaner.engine.step): a finished arm with the same selection, dataset version,
    baseline and evaluation settings is reused whole; other settings are refused."""
    store = Store(config.store.url, config.store.options)

    def evaluate_arm() -> dict[str, Any]:
        trained = steps.finetune_selection(run_id, config, selection, chosen["dataset"])
        result = steps.arm_record(arm, selection, chosen,
                                  steps.finetune_facts(run_id, config, trained))
        if selection.dpo:
            result["dpo"] = steps.dpo_selection(run_id, config, selection,
                                                pool_run(config, run_id))
        if selection.model == baseline.model:
            steps.answer_fn(run_id, config)(selection.model, steps.test_prompts(config))
        else:
            evaluation = steps.judge_baseline(run_id, config, selection, baseline)
            result.update(evaluation=steps.compact(evaluation),
                          bias=steps.length_bias(run_id, config, evaluation))
        result["answer_chars"] = steps.answer_chars(run_id, config, selection.model)
        if config.experiment.mt_bench:
            result["mt_bench"] = run_mt_bench(store, run_id, config, selection.model)
        result["cost"] = steps.arm_cost(result, signals_usd, config)
        result["result"] = steps.write_arm(run_id, config, result)
        return result

    step = steps.ArmStep(config, arm, selection, baseline, chosen, evaluate_arm)
    return run_step(store, run_id, step)
