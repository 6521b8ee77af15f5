"""One arm of the grid, plain steps: fine-tune, answer, judge against the baseline, bias, MT-Bench.

Every step relies on the store's checkpoints, so a rerun redoes only what is
missing: a model whose summary and weights are in the store is not trained
again (``run_finetune``), answers are reused while the model version is the
same (``answer_model``), and the judge and MT-Bench grading are engine stages
whose finished parts (and cache, by pair content) are not asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import Step
from gleaner.store import Store
from gleaner.tasks.evaluate.eval_sets import EvalPrompt, load_eval_set
from gleaner.tasks.evaluate.stage import JUDGEMENT_SCHEMA
from gleaner.tasks.evaluate.step import verdict_settings
from gleaner.tasks.experiment.arms import Selection
from gleaner.tasks.publish.versions import read_version


class ArmsFailed(RuntimeError):
    """Some arms failed after their retries; ``result`` is the grid with what did finish."""

    def __init__(self, result: dict[str, Any]):
        failed = ", ".join(f"{a['arm']} ({a['status']}: {a.get('error', '')})"
                           for a in result["arms"] if a["status"] != "ok")
        super().__init__(f"experiment {result['experiment']}: arms not finished: {failed}")
        self.result = result


def _store(config: GleanerConfig) -> Store:
    return Store(config.store.url, config.store.options)


@task(name="experiment-finetune", retries=0, cache_policy=NO_CACHE)
def finetune_selection(run_id: str, config: GleanerConfig, selection: Selection,
                       dataset: dict[str, Any]) -> dict[str, Any]:
    """The selection's fine-tune, trained on exactly its published dataset version."""
    from gleaner.tasks.train.run import run_finetune

    store = _store(config)
    table = read_version(store, dataset["name"], dataset["version"])
    return run_finetune(store, run_id, config, table, name=selection.sft_model)


DPO_KEYS = ("name", "start", "pairs_run", "beta", "steps", "final_loss", "reward_accuracy",
            "reward_margin", "wall_seconds", "reused", "model")


@task(name="experiment-dpo", retries=0, cache_policy=NO_CACHE)
def dpo_selection(run_id: str, config: GleanerConfig, selection: Selection, pool: str
                  ) -> dict[str, Any]:
    """A DPO arm's policy: DPO (``config.dpo``) from the selection's fine-tune on the pool
    run's comparison pairs; what the table shows of it."""
    from gleaner.tasks.dpo.train import run_dpo_train

    settings = config.with_overrides({"dpo.sft_model": selection.sft_model,
                                      "dpo.name": selection.model, "dpo.pairs_run": pool})
    summary = run_dpo_train(_store(config), run_id, settings)
    return {**{k: summary.get(k) for k in DPO_KEYS}, "pairs": summary["data"]["train_pairs"]}


def test_prompts(config: GleanerConfig) -> dict[str, list[EvalPrompt]]:
    """The test sets' prompts (``evaluate.limit`` first of each), by set name."""
    out: dict[str, list[EvalPrompt]] = {}
    for spec in config.evaluate.test_sets:
        prompts = load_eval_set(spec, config.evaluate.test_sets_dir, config.evaluate.limit)
        out[prompts[0].test_set if prompts else spec] = prompts
    return out


AnswerFn = Callable[[str, dict[str, list[EvalPrompt]]], dict[str, list[str]]]


def answer_fn(run_id: str, config: GleanerConfig) -> AnswerFn:
    """Each model's answering as a Prefect task run of its own (visible, checkpointed)."""
    from gleaner.tasks.evaluate.run import answer_task, label_of

    def answer(reference: str, prompts: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
        named = answer_task.with_options(task_run_name=f"answer-{label_of(reference)}")
        return named(run_id, config, reference, prompts)

    return answer


def judge_baseline(run_id: str, config: GleanerConfig, selection: Selection,
                   baseline: Selection) -> dict[str, Any]:
    """The arm's model (A) against the baseline's (B), both orders (AlpaGasus' protocol)."""
    from gleaner.tasks.evaluate.run import run_evaluate

    return run_evaluate(_store(config), run_id, config, model_a=selection.model,
                        model_b=baseline.model, answer_fn=answer_fn(run_id, config))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bias_of(table: pa.Table) -> dict[str, Any]:
    """Length and position bias of one test set's judgements: the mean answer length of both
    models, how often the two orders disagree, and how often the longer answer won."""
    rows = table.select(["answer_a", "answer_b", "outcome_a_first", "outcome_b_first"]).to_pylist()
    both = [r for r in rows if r["outcome_a_first"] and r["outcome_b_first"]]
    disagree = sum(r["outcome_a_first"] != r["outcome_b_first"] for r in both)
    decided = [r for r in both if r["outcome_a_first"] == r["outcome_b_first"] != "tie"
               and len(r["answer_a"]) != len(r["answer_b"])]
    longer = sum((r["outcome_a_first"] == "win") == (len(r["answer_a"]) > len(r["answer_b"]))
                 for r in decided)
    return {"mean_answer_chars_arm": _mean([len(r["answer_a"]) for r in rows]),
            "mean_answer_chars_baseline": _mean([len(r["answer_b"]) for r in rows]),
            "pairs_both_orders": len(both), "orders_disagree": disagree,
            "order_disagreement": disagree / len(both) if both else None,
            "decided_with_length_gap": len(decided),
            "longer_answer_won": longer / len(decided) if decided else None}


def length_bias(run_id: str, config: GleanerConfig, evaluation: dict[str, Any]
                ) -> dict[str, dict[str, Any]]:
    store = _store(config)
    out = {}
    for test_set in evaluation["test_sets"]:
        stage = layout.judge_stage(evaluation["comparison"], test_set)
        if store.has_stage(run_id, stage):
            out[test_set] = bias_of(store.read_stage(run_id, stage, schema=JUDGEMENT_SCHEMA))
    return out


def answer_chars(run_id: str, config: GleanerConfig, model: str) -> dict[str, float | None]:
    """Mean answer length of one model per test set (the baseline's row of the bias table)."""
    store = _store(config)
    out = {}
    for test_set in test_prompts(config):
        path = layout.answers_path(store, run_id, model, test_set)
        if store.exists(path):
            answers = store.dataset([path]).to_table(columns=["answer"]).column("answer")
            out[test_set] = _mean([len(a) for a in answers.to_pylist()])
    return out


FINETUNE_KEYS = ("steps", "final_loss", "wall_seconds", "train_seconds", "tokens_per_s",
                 "reused", "model", "device")


def finetune_facts(run_id: str, config: GleanerConfig, summary: dict[str, Any]
                   ) -> dict[str, Any]:
    """What the table shows of a fine-tune: tokens trained on and time, from the store."""
    store = _store(config)
    metrics_path = layout.finetune_file(store, run_id, summary["name"], "metrics.json")
    metrics = store.read_json(metrics_path) if store.exists(metrics_path) else {}
    return {**{k: summary.get(k) for k in FINETUNE_KEYS},
            "train_tokens": metrics.get("tokens"), "examples": summary["data"]["examples"],
            "sequences": summary["data"]["sequences"]}


class ArmStep(Step):
    """One arm of the grid on the step contract: its key is the selection (settings over the
    pool, with the fine-tune's), the dataset version it was trained on, the baseline it is
    judged against and the evaluation settings; its result file is its output."""

    kind = "arm"
    force_hint = "another experiment.name (or --run-id)"

    def __init__(self, config: GleanerConfig, arm: str, selection: Selection,
                 baseline: Selection, chosen: dict[str, Any],
                 evaluate: Callable[[], dict[str, Any]]):
        self.config, self.arm, self.selection, self.baseline = config, arm, selection, baseline
        self.dataset = {k: chosen["dataset"][k] for k in ("name", "version")}
        self.evaluate = evaluate

    @property
    def name(self) -> str:
        return f"arm/{self.config.experiment.name}/{self.arm}"

    def settings(self) -> dict[str, Any]:
        e, m = self.config.evaluate, self.config.mt_bench
        return {"selection": self.selection.key, "dataset": self.dataset,
                "baseline": self.baseline.key, "test_sets": list(e.test_sets),
                "rule": e.rule, "limit": e.limit, **verdict_settings(self.config),
                "mt_bench": m.model_dump(mode="json", include={
                    "question_ids", "per_category", "answers", "max_tokens"})
                if self.config.experiment.mt_bench else None}

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(layout.experiment_arm_path(store, run_id, self.config.experiment
                                                       .name, self.arm))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        return self.evaluate()


def write_arm(run_id: str, config: GleanerConfig, result: dict[str, Any]) -> str:
    """The arm's result, written last: its presence says the arm finished."""
    store = _store(config)
    path = layout.experiment_arm_path(store, run_id, config.experiment.name, result["arm"])
    store.write_json(path, result)
    return store.uri(path)


def arm_record(arm: str, selection: Selection, chosen: dict[str, Any],
               finetune: dict[str, Any]) -> dict[str, Any]:
    """The arm's row before judging: its selection, dataset version, size, lengths, model."""
    return {"arm": arm, "status": "ok", "selection": selection.name,
            "shares_selection_with": [a for a in selection.arms if a != arm],
            "baseline": selection.baseline, "selector": selection.settings,
            "model": selection.model, "dataset": chosen["dataset"],
            "examples": chosen["examples"], "reasons": chosen["reasons"],
            "mean_response_chars": chosen["mean_response_chars"],
            "mean_response_tokens": chosen["mean_response_tokens"], "finetune": finetune}


TALLY_KEYS = ("win", "tie", "lose", "failed", "winning_score", "win_rate", "lc_win_rate",
              "prompt_tokens", "completion_tokens", "cost_usd")


def compact(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What the grid keeps of an evaluation summary (the markdown stays in its report)."""
    return {"comparison": evaluation["comparison"], "rule": evaluation["rule"],
            "judge_model": evaluation["judge_model"], "price_known": evaluation["price_known"],
            "report": evaluation["report"], "chart": evaluation["chart"],
            "test_sets": {n: {k: t[k] for k in TALLY_KEYS}
                          for n, t in evaluation["test_sets"].items()},
            "overall": {k: evaluation["overall"][k] for k in TALLY_KEYS}}


def arm_cost(result: dict[str, Any], signals_usd: float | None, config: GleanerConfig
             ) -> dict[str, Any]:
    """Rating/scoring (the signals it selects by), pairwise judging and MT-Bench grading
    (nothing when gleaner's own offline server judged; None where the price is unknown)."""
    evaluation, mt = result.get("evaluation"), result.get("mt_bench")
    offline = bool(config.evaluate.endpoint.local_server)
    judge = 0.0 if offline or not evaluation else (
        evaluation["overall"]["cost_usd"] if evaluation["price_known"] else None)
    mt_usd = 0.0 if offline or not mt else mt.get("cost_usd")
    total = None if judge is None or mt_usd is None else round(judge + mt_usd, 6)
    return {"signals_usd": signals_usd, "pairwise_usd": judge, "mt_bench_usd": mt_usd,
            "judge_usd": total}
