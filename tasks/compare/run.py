"""Comparison data: gather K responses per prompt, grade them, make the pairs.

``gather_responses`` reads the sources; the whole comparison is one step
(:class:`CompareStep`, gleaner.engine.step): its key is the sources asked for, the limit
and the grader's settings, its input the gathered responses themselves, so a rerun over the
same responses writes and asks nothing. Inside it, ``compare/responses`` is written, the
grading is an engine stage (:class:`GradeStage`, batches on Ray, cached per (prompt,
response, judge)), and ``make_pairs`` joins the grades back and writes ``compare/pairs``
with its summary. Every response read ends judged (scored or failed), merged into an
identical one, skipped as empty, or in a prompt with a single response (no pair possible):
counted.
"""

from __future__ import annotations

import logging
from typing import Any

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.engine.step import Step, run_step
from gleaner.runs import record_run
from gleaner.store import Store
from gleaner.tasks.compare.pairs import build_pairs
from gleaner.tasks.compare.sources import Gathered, SourceContext, gather, resolve
from gleaner.tasks.compare.stage import GRADE_SCHEMA, GradeStage
from gleaner.tasks.train.run import table_version

log = logging.getLogger("gleaner.compare")


def gather_responses(store: Store, run_id: str, config: GleanerConfig,
                     specs: list[str] | None = None, limit: int | None = None) -> Gathered:
    """Read every source: the distinct (prompt, response) rows to judge (CompareStep writes
    them)."""
    specs = specs or config.compare.responses
    if len(set(specs)) != len(specs):
        raise ValueError(f"--responses names a source twice: {specs}")
    ctx = SourceContext(store, run_id, config)
    results = {}
    for spec in specs:
        source, arg, label = resolve(spec)
        results[label] = source(ctx, arg)
    gathered = gather(results, limit)
    c = gathered.counts
    distinct = c["responses"] + c["responses_single_prompt"] + c["responses_beyond_limit"]
    if c["responses_read"] != c["empty_skipped"] + c["duplicates_merged"] + distinct:
        raise RuntimeError(f"compare: response counts do not add up: {c}")
    if c["prompts_single_response"]:
        log.warning("%d prompts have a single response (no pair possible): not judged",
                    c["prompts_single_response"])
    return gathered


class CompareStep(Step):
    """Gathered responses graded and paired (see the module)."""

    kind = "compare"
    force_hint = "--force (gleaner compare)"

    def __init__(self, config: GleanerConfig, specs: list[str], gathered: Gathered):
        self.config, self.specs, self.gathered = config, specs, gathered

    def settings(self) -> dict[str, Any]:
        return {"responses": self.specs, "limit": self.config.compare.limit,
                "grader": GradeStage(self.config.compare).requested()}

    def inputs(self) -> dict[str, Any]:
        return {"responses": table_version(self.gathered.table)}

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(layout.summary_path(store, run_id, layout.COMPARE_PAIRS))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        store.clear_stage(run_id, layout.COMPARE_RESPONSES)
        store.write_part(run_id, layout.COMPARE_RESPONSES, 0, self.gathered.table)
        grading = grade_responses(self.config, run_id)
        summary = make_pairs(store, run_id, self.config, self.gathered, grading)
        record_run(store, run_id, self.config, compare={k: summary[k] for k in (
            "prompts", "responses", "scored", "failed", "pairs", "ties_skipped", "pairs_path")})
        return summary

    def markdown(self, summary: dict[str, Any]) -> str:
        return summary_markdown(summary)


def compare(store: Store, run_id: str, config: GleanerConfig,
            specs: list[str] | None = None) -> dict[str, Any]:
    """The run's comparison data (a step: done once per set of gathered responses)."""
    specs = list(specs or config.compare.responses)
    gathered = gather_responses(store, run_id, config, specs, config.compare.limit)
    return run_step(store, run_id, CompareStep(config, specs, gathered),
                    force=config.compare.force)


def grade_responses(config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """The grading stage over the gathered responses (inside a flow run on Ray); none
    gathered (no prompt with two responses) is a stage of no rows, summarised as any."""
    return run_stage(GradeStage(config.compare), config, run_id)


def make_pairs(store: Store, run_id: str, config: GleanerConfig, gathered: Gathered,
               grading: dict[str, Any]) -> dict[str, Any]:
    """Pairs with s_l < s_h from the grades; the summary of the whole comparison."""
    responses = gathered.table.to_pylist()
    grades: dict[str, dict[str, Any]] = {}
    if responses:
        table = store.read_stage(run_id, layout.COMPARE_JUDGE,
                                 columns=["id", "status", "score"], schema=GRADE_SCHEMA)
        grades = {r["id"]: r for r in table.to_pylist()}
    pairs, counts = build_pairs(responses, grades)
    store.clear_stage(run_id, layout.COMPARE_PAIRS)
    store.write_part(run_id, layout.COMPARE_PAIRS, 0, pairs)
    sources = gathered.counts
    summary = {
        "run_id": run_id, "judge_model": config.compare.endpoint.model,
        "responses_from": sources["by_source"], **{k: v for k, v in sources.items()
                                                   if k != "by_source"},
        "scored": counts["scored"], "failed": counts["failed"], "pairs": counts["pairs"],
        "ties_skipped": counts["ties_skipped"],
        "prompts_without_pair": counts["prompts_without_pair"],
        "failures": grading.get("failures", {}), "cached": grading.get("cached", 0),
        "requests": grading.get("requests", 0), "prompt_tokens": grading.get("prompt_tokens", 0),
        "completion_tokens": grading.get("completion_tokens", 0),
        "est_cost_usd": grading.get("est_cost_usd", 0.0),
        "pairs_path": store.uri(store.stage_path(run_id, layout.COMPARE_PAIRS)),
    }
    store.write_json(layout.summary_path(store, run_id, layout.COMPARE_PAIRS), summary)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    return "\n".join([
        f"# Comparison data of run `{summary['run_id']}`", "",
        f"judge `{summary['judge_model']}`; responses from "
        + ", ".join(f"{k} ({v})" for k, v in summary["responses_from"].items()), "",
        "| prompts | judged | responses | scored | failed | pairs | ties skipped |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['prompts']} | {summary['prompts_judged']} | {summary['responses']} | "
        f"{summary['scored']} | {summary['failed']} | {summary['pairs']} | "
        f"{summary['ties_skipped']} |", "",
        f"{summary['prompts_single_response']} prompts with one response (no pair), "
        f"{summary['duplicates_merged']} identical responses merged, "
        f"{summary['empty_skipped']} empty skipped; {summary['cached']} grades from the cache, "
        f"{summary['requests']} requests, est. ${summary['est_cost_usd']:.4f}",
    ])
