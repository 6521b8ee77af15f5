"""MT-Bench for one model, plain steps: answer both turns, grade on the engine, average.

Scores as FastChat's ``show_result`` reports them: the mean rating over every
graded (question, turn), per turn, and per category (both turns); a grade that
failed (no ``[[rating]]`` after the retries, a transport error) is counted apart
and never averaged in. The summary goes to
``runs/<id>/evaluate/mt_bench/<model>/summary.json``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine import run_stage
from gleaner.engine.step import Step, run_step
from gleaner.engine.summary import estimate_cost
from gleaner.store import Store
from gleaner.tasks.mtbench.answers import answer_mt_bench
from gleaner.tasks.mtbench.questions import load_questions
from gleaner.tasks.mtbench.stage import GRADE_SCHEMA, GradeStage, request_rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scores(requests: pa.Table, grades: pa.Table) -> dict[str, Any]:
    """Means overall, per turn and per category; failures counted, never averaged."""
    where = {r["id"]: r for r in requests.to_pylist()}
    ratings: list[float] = []
    by_turn: dict[int, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for row in grades.select(["id", "status", "rating"]).to_pylist():
        request = where[row["id"]]
        if row["status"] != "ok":
            failed[request["category"]] += 1
            continue
        ratings.append(row["rating"])
        by_turn[request["turn"]].append(row["rating"])
        by_category[request["category"]].append(row["rating"])
    categories = sorted({r["category"] for r in where.values()})
    return {
        "overall": _mean(ratings), "graded": len(ratings), "failed": sum(failed.values()),
        "requests": len(where),
        "turns": {str(t): _mean(by_turn[t]) for t in (1, 2)},
        "categories": {c: {"mean": _mean(by_category[c]), "graded": len(by_category[c]),
                           "failed": failed[c]} for c in categories},
    }


class MTBenchStep(Step):
    """One model's MT-Bench on the step contract: its key the questions, how they are
    answered and graded; its input the model's version (a retrained model is asked again)."""

    kind = "mt_bench"
    force_hint = "mt_bench.force: true"

    def __init__(self, store: Store, run_id: str, config: GleanerConfig, reference: str,
                 questions: list[Any]):
        from gleaner.tasks.evaluate.run import label_of, model_identity

        self.config, self.reference, self.questions = config, reference, questions
        self.label = label_of(reference)
        self.version = model_identity(store, run_id, config, reference)

    @property
    def name(self) -> str:
        return f"mt_bench/{self.label}"

    def settings(self) -> dict[str, Any]:
        m, g = self.config.mt_bench, self.config.evaluate.generation
        return {"questions": [q.question_id for q in self.questions],
                "files": [m.questions_file, m.references_file,
                          self.config.evaluate.test_sets_dir],
                "answers": m.answers.model_dump(mode="json"),
                "generation": {"backend": g.backend, "dtype": g.dtype},
                "grader": {"model": self.config.evaluate.endpoint.model,
                           "max_tokens": m.max_tokens}}

    def inputs(self) -> dict[str, Any]:
        return {"model": self.version}

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(layout.mt_bench_summary_path(store, run_id, self.label))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        return _mt_bench(store, run_id, self.config, self.reference, self.questions)

    def markdown(self, summary: dict[str, Any]) -> str:
        return markdown(summary)


def run_mt_bench(store: Store, run_id: str, config: GleanerConfig, reference: str
                 ) -> dict[str, Any]:
    """One model's MT-Bench score (needs a judge endpoint, Ray and a flow run to grade); a
    step: a rerun for the same model version and settings asks nothing."""
    step = MTBenchStep(store, run_id, config, reference, load_questions(config))
    return run_step(store, run_id, step, force=config.mt_bench.force)


def _mt_bench(store: Store, run_id: str, config: GleanerConfig, reference: str,
              questions: list[Any]) -> dict[str, Any]:
    from gleaner.tasks.evaluate.run import label_of

    label = label_of(reference)
    answers = answer_mt_bench(store, run_id, config, reference, questions)
    requests = request_rows(answers, {q.question_id: q.references for q in questions})
    stage = GradeStage(config, label)
    store.clear_stage(run_id, stage.input_stage)
    store.write_part(run_id, stage.input_stage, 0, requests)
    stage_summary = run_stage(stage, config, run_id)
    grades = store.read_stage(run_id, stage.name, schema=GRADE_SCHEMA)
    price = config.prices.get(config.evaluate.endpoint.model)  # None: the cost is unknown
    summary = {
        "run_id": run_id, "model": label, "judge_model": config.evaluate.endpoint.model,
        "questions": len(questions), **scores(requests, grades),
        "answer_chars": {str(t): _mean([len(a) for a in answers.column(f"answer_{t}")
                                        .to_pylist()]) for t in (1, 2)},
        "prompt_tokens": stage_summary["prompt_tokens"],
        "completion_tokens": stage_summary["completion_tokens"],
        "judge_requests": stage_summary["requests"],
        "cost_usd": estimate_cost(price, stage_summary["prompt_tokens"],
                                  stage_summary["completion_tokens"]),
        "answers": store.uri(layout.mt_bench_answers_path(store, run_id, label)),
    }
    store.write_json(layout.mt_bench_summary_path(store, run_id, label), summary)
    return summary


def _show(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    """Per-category means (FastChat's radar data) as a table."""
    lines = [f"# MT-Bench: {summary['model']} (judge {summary['judge_model']})", "",
             f"overall **{_show(summary['overall'])}** (turn 1 {_show(summary['turns']['1'])}, "
             f"turn 2 {_show(summary['turns']['2'])}); {summary['graded']} grades, "
             f"{summary['failed']} failed",
             "", "| category | mean | graded | failed |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {_show(c['mean'])} | {c['graded']} | {c['failed']} |"
              for name, c in summary["categories"].items()]
    return "\n".join(lines) + "\n"
