"""The grid's budget guard: what an experiment would train, generate and send, before it spends.

Built on the cost plan (gleaner.tasks.cost.plan): the pool's LLM stages the arms need
(rating, DEITA's scorers behind an endpoint) are planned by the engine's own
bookkeeping (finished parts and the cache subtracted, the stage's real request
bodies counted); each arm's judging against the baseline by ``plan_judge``
(both orders, answers at their token cap: an upper bound); MT-Bench grading
the same way (two grades per question, the answers at ``mt_bench.answers.max_tokens``).
Work the store already holds (a trained model, stored answers, a test set judged
in full) is not planned again. Fine-tunes are counted in tokens of the base
model's tokenizer on a sample of the pool, arm sizes from their settings (a
threshold arm at most the pool). Above ``experiment.max_usd`` (else
``budget.max_usd``) or ``experiment.max_finetunes`` the grid needs ``--yes``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.runner import read_summary
from gleaner.engine.step import publish_markdown
from gleaner.models import SMOLLM2_NAME
from gleaner.store import Store
from gleaner.tasks.cost.plan import (
    StagePlan,
    llm_stages,
    plan_finetunes,
    plan_judge,
    plan_stage,
    priced,
)
from gleaner.tasks.cost.report import OverBudget, plan_markdown, plan_text
from gleaner.tasks.experiment.arms import Selection, plan_selections
from gleaner.tasks.experiment.pool import needed_stages, pool_run
from gleaner.tasks.train.memory_plan import model_shape, plan_for_section
from gleaner.tasks.train.recipes import build_recipe
from gleaner.tasks.train.run import base_model_source

OFFLINE = f"{SMOLLM2_NAME} (gleaner's offline server)"


def _offline(entry: StagePlan) -> StagePlan:
    """A stage served by gleaner's own llama.cpp server costs nothing."""
    entry.notes.append("served by gleaner's offline llama.cpp server: no charge")
    return dataclasses.replace(entry, model=OFFLINE, priced=True, sync_usd=0.0, batch_usd=0.0)


def _done(store: Store, run_id: str, entry: StagePlan) -> StagePlan:
    """A judging stage the store holds in full is not asked again (its parts stand)."""
    summary = read_summary(store, run_id, entry.stage)
    if not (summary and summary.get("status") == "completed" and summary.get("failed") == 0
            and summary.get("examples") == entry.rows):
        return entry
    entry.notes.append("judged in full already (the store's parts): nothing to send")
    return dataclasses.replace(entry, finished=entry.rows, to_do=0, requests=0,
                               prompt_tokens=0, completion_tokens=0, sync_usd=0.0,
                               batch_usd=0.0)


def sizes(selections: list[Selection], pool_rows: int) -> dict[str, tuple[int, str]]:
    """Each selection's size as its settings say (exact, or an upper bound, said so)."""
    from gleaner.registry import registry

    out: dict[str, tuple[int, str]] = {}
    for s in selections:
        settings = s.settings
        if s.size_of:
            out[s.name] = (out[s.size_of][0], f"as many as {s.size_of}")
        elif settings.get("fraction") is not None:
            out[s.name] = (round(settings["fraction"] * pool_rows), f"{settings['fraction']:.1%}")
        elif settings.get("budget") is not None:
            out[s.name] = (min(settings["budget"], pool_rows), f"budget {settings['budget']:,}")
        elif registry("selector").get(settings["selector"]).keeps_everything:
            out[s.name] = (pool_rows, "the whole pool")
        else:
            out[s.name] = (pool_rows, "at most the whole pool (a threshold decides)")
    return out


def trained(store: Store, run_id: str, model: str) -> bool:
    return store.exists(layout.finetune_file(store, run_id, model, "summary.json")) and \
        store.exists(f"{layout.model_dir(store, run_id, model)}/config.json")


def judge_entries(store: Store, run_id: str, config: GleanerConfig, selection: Selection,
                  baseline: Selection) -> list[StagePlan]:
    versus = config.with_overrides({"evaluate.model_a": selection.model,
                                    "evaluate.model_b": baseline.model})
    return [_done(store, run_id, e) for e in plan_judge(versus)]


def mt_bench_entry(store: Store, run_id: str, config: GleanerConfig, model: str) -> StagePlan:
    """Two grades per question; the answers shown counted at their token cap (upper bound)."""
    from gleaner.engine.replay import CHAT_URL
    from gleaner.llm.client import chat_request, request_body
    from gleaner.tasks.cost.tokens import counter_for
    from gleaner.tasks.mtbench.prompts import grading_messages, judge_prompt
    from gleaner.tasks.mtbench.questions import load_questions

    judge, settings = config.evaluate.endpoint, config.mt_bench
    counter = counter_for(judge, config.budget)
    max_tokens = settings.max_tokens if judge.base_url else settings.offline_max_tokens
    questions = load_questions(config)
    prompt = 0
    for q in questions:
        refs = list(q.references) if q.references else None
        for turn in (1, 2):
            messages = grading_messages(judge_prompt(q.category, turn), list(q.turns),
                                        ["", ""], refs)
            body = request_body(chat_request(judge.model, messages, max_tokens=max_tokens))
            prompt += counter.prompt_tokens(CHAT_URL, body) + turn * settings.answers.max_tokens
    n = 2 * len(questions)
    entry = priced(StagePlan(
        layout.mt_bench_grades_stage(model), judge.model, judge.api, n, 0, 0, n, n, prompt,
        n * max_tokens, True, counter.name, False, None, None,
        [f"answers counted at mt_bench.answers.max_tokens = {settings.answers.max_tokens} tokens"]),
        config.prices.get(judge.model))
    return _done(store, run_id, entry)


def generations(store: Store, run_id: str, config: GleanerConfig, models: list[str]) -> int:
    """Answers to generate: test-set prompts and MT-Bench turns of models not answered yet."""
    from gleaner.tasks.experiment.steps import test_prompts

    prompts = test_prompts(config)
    count = 0
    for model in models:
        count += sum(len(p) for name, p in prompts.items()
                     if not store.exists(layout.answers_path(store, run_id, model, name)))
        if config.experiment.mt_bench and not store.exists(
                layout.mt_bench_answers_path(store, run_id, model)):
            from gleaner.tasks.mtbench.questions import load_questions

            count += 2 * len(load_questions(config))
    return count


def experiment_plan(store: Store, run_id: str, config: GleanerConfig,
                    input_store: Store | None = None) -> dict[str, Any]:
    """The plan of experiment ``config.experiment`` in run ``run_id`` (its pool ingested in
    ``input_store``: the store, or a scratch one before ingesting)."""
    input_store = input_store or store
    pool = pool_run(config, run_id)
    selections = plan_selections(config, pool)
    stages = needed_stages(selections)
    examples = input_store.read_stage(pool, layout.INGEST)
    entries = [_offline(e) if stage.endpoint.base_url is None else e
               for stage in llm_stages(config) if stage.name in stages
               for e in plan_stage(stage, store, pool, input_store, config)]
    baseline = next(s for s in selections if s.baseline)
    for selection in selections:
        if selection is not baseline:
            entries += judge_entries(store, run_id, config, selection, baseline)
        if config.experiment.mt_bench:
            entries.append(mt_bench_entry(store, run_id, config, selection.model))
    if config.evaluate.endpoint.base_url is None:
        entries = [_offline(e) if e.stage.startswith("evaluate/") else e for e in entries]
    return assemble(store, run_id, config, selections, stages, entries, examples)


def assemble(store: Store, run_id: str, config: GleanerConfig, selections: list[Selection],
             stages: list[str], entries: list[StagePlan], examples: pa.Table) -> dict[str, Any]:
    per_example = plan_finetunes(config.with_overrides({
        "curate.train": True, "finetune.baseline": "none",
        "select.size": max(1, examples.num_rows)}), examples)
    size = sizes(selections, examples.num_rows)
    recipe = build_recipe(config.finetune.preset, config.finetune.overrides)
    base = base_model_source(config.finetune.base_model)
    shape = model_shape(base)
    finetunes: list[dict[str, Any]] = []
    planned: set[str] = set()
    for s in selections:
        if s.sft_model in planned:  # a DPO arm's fine-tune is its twin's: counted once
            continue
        planned.add(s.sft_model)
        n, how = size[s.name]
        memory = plan_for_section(config.finetune, base, max(1, n), shape)
        tokens = per_example[0].tokens_per_example if per_example else 0.0
        epochs = per_example[0].epochs if per_example else 0.0
        seen = n * epochs  # examples trained on; max_steps stops earlier
        if recipe.max_steps is not None:
            seen = min(seen, recipe.max_steps * recipe.effective_batch_size)
            how += f"; at most max_steps = {recipe.max_steps} steps"
        done = trained(store, run_id, s.sft_model)
        if s.dpo:
            how += f"; then DPO (beta {config.dpo.beta}) on the pool run's comparison pairs"
        finetunes.append({"arm": s.name, "model": s.sft_model, "examples": n, "epochs": epochs,
                          "tokens_per_example": tokens, "tokens": 0 if done else round(
                              tokens * seen), "trained": done,
                          "tokenizer": per_example[0].tokenizer if per_example else "",
                          "note": "in the store already" if done else how,
                          "memory": {k: getattr(memory, k) for k in (
                              "fits", "per_gpu_bytes", "effective_batch", "steps", "reasons")}})
    known = [e for e in entries if e.priced]
    exp = config.experiment
    limit = exp.max_usd if exp.max_usd is not None else config.budget.max_usd
    total = round(sum(e.usd or 0.0 for e in known), 6)
    # distinct models: a DPO arm's fine-tune is its twin's, then its own DPO policy
    models = {s.sft_model for s in selections} | {s.model for s in selections if s.dpo}
    to_train = sum(not trained(store, run_id, name) for name in models)
    plan: dict[str, Any] = {
        "run_id": run_id, "experiment": exp.name, "pool_run": pool_run(config, run_id),
        "made_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "examples": examples.num_rows, "pool_stages": stages,
        "arms": {a: s.name for s in selections for a in s.arms},
        "stages": [{**asdict(e), "usd": e.usd} for e in entries], "finetunes": finetunes,
        "total_usd": total,
        "total_sync_usd": round(sum(e.sync_usd or 0.0 for e in known), 6),
        "total_batch_usd": round(sum(e.batch_usd or 0.0 for e in known), 6),
        "unpriced": sorted({e.model for e in entries if not e.priced}),
        "unpriced_spend": sorted({e.model for e in entries if not e.priced and e.requests}),
        "counts": {"finetunes": to_train, "generations": generations(
            store, run_id, config, [s.model for s in selections]),
            "judge_calls": sum(e.requests for e in entries if e.stage.startswith("evaluate/"))},
        "limit_usd": limit, "max_finetunes": exp.max_finetunes,
        "max_usd": None,  # the cost plan's own budget line: the limit is ours (limit_usd)
    }
    plan["over_budget"] = limit is not None and total > limit
    plan["over_finetunes"] = exp.max_finetunes is not None and to_train > exp.max_finetunes
    plan["unfit"] = sorted({reason for f in finetunes if not f["trained"]
                            for reason in f["memory"]["reasons"]})
    return plan


def text(plan: dict[str, Any]) -> str:
    """The plan as the terminal shows it before anything is spent."""
    counts = plan["counts"]
    lines = [plan_text(plan), f"experiment {plan['experiment']}: {counts['finetunes']} "
             f"fine-tune(s) to train, {counts['generations']:,} answers to generate, "
             f"{counts['judge_calls']:,} judge calls (pool stages: "
             f"{', '.join(plan['pool_stages']) or 'none'})"]
    for ft in plan["finetunes"]:
        memory = ft["memory"]
        lines.append(f"  arm {ft['arm']}: {ft['examples']:,} examples ({ft['note']}), "
                     f"{ft['tokens']:,} training tokens, {memory['steps']:,} steps, "
                     f"{memory['per_gpu_bytes'] / 2**30:.1f} GiB per GPU"
                     + ("" if memory["fits"] else " (does NOT fit)"))
    if plan["limit_usd"] is not None:
        verdict = "OVER" if plan["over_budget"] else "within"
        lines.append(f"limit: ${plan['limit_usd']:,.4f} ({verdict})")
    if plan["max_finetunes"] is not None:
        lines.append(f"limit: {plan['max_finetunes']} fine-tunes "
                     f"({'OVER' if plan['over_finetunes'] else 'within'})")
    return "\n".join(lines)


def announce(store: Store, run_id: str, plan: dict[str, Any]) -> None:
    """The plan on the terminal (stderr), in the store and as a Prefect artifact."""

    from gleaner.artifacts import artifact_key

    sys.stderr.write(text(plan) + "\n")
    store.write_json(layout.experiment_file(store, run_id, plan["experiment"], "plan.json"), plan)
    publish_markdown(artifact_key("experiment-plan", run_id),
                     plan_markdown(plan) + "\n\n```\n" + text(plan) + "\n```\n",
                     f"what experiment {plan['experiment']} will spend")


def check_guard(plan: dict[str, Any], approved: bool) -> None:
    """Refuse to spend above a configured limit unless a person said yes (--yes)."""
    reasons = []
    if plan["over_budget"]:
        reasons.append(f"the plan comes to ${plan['total_usd']:,.4f}, over the limit of "
                       f"${plan['limit_usd']:,.4f} (experiment.max_usd / budget.max_usd)")
    if plan["limit_usd"] is not None and plan["unpriced_spend"]:
        reasons.append(f"no price is known for {', '.join(plan['unpriced_spend'])}, so the "
                       f"plan cannot be held to the limit of ${plan['limit_usd']:,.4f} (add "
                       "its prices under prices.<model> in the config)")
    if plan["over_finetunes"]:
        reasons.append(f"{plan['counts']['finetunes']} fine-tunes to train, over "
                       f"experiment.max_finetunes = {plan['max_finetunes']}")
    if plan.get("unfit"):  # no --yes makes a run fit
        raise OverBudget(f"experiment {plan['experiment']}: its fine-tunes are refused before "
                         f"any GPU is booked: {'; '.join(plan['unfit'])}")
    if reasons and not approved:
        raise OverBudget(f"experiment {plan['experiment']}: {'; '.join(reasons)}. Pass --yes "
                         "to spend it, or raise the limit")


def plan_only(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """The plan without running anything (``gleaner experiment --plan``): a pool not ingested
    yet is ingested into a scratch store, so nothing is written."""
    from gleaner.tasks.cost.plan import scratch_ingest

    store = Store(config.store.url, config.store.options)
    pool = pool_run(config, run_id)
    if store.has_stage(pool, layout.INGEST) or not config.experiment.pool.sources:
        return experiment_plan(store, run_id, config)
    with scratch_ingest(config.experiment.pool.sources, config, pool) as scratch:
        return experiment_plan(store, run_id, config, scratch)
