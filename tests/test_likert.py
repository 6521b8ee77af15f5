"""LIMA's absolute evaluation: the 6-point helpfulness rating of every answer on the engine's row
loop, against a loopback judge answering in LIMA's format; the bootstrap interval on synthetic
ratings; `gleaner evaluate --likert` through the CLI; N sampled answers from a real tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect import flow
from prefect_ray import RayTaskRunner
from typer.testing import CliRunner

from gleaner.config import GleanerConfig
from gleaner.tasks.evaluate.likert import (
    LIKERT_TEMPLATE,
    Rated,
    bootstrap_ci,
    likert_messages,
    parse_likert,
    rate_answers,
)
from tests.support.openai_server import OpenAIStub, Reply
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    build_tiny_model,
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)

SUBMISSION = re.compile(r"\[Submission\]: (.*?)\n\*\*\*\n\[Criterion\]", re.S)
PAIRWISE = re.compile(r"\[The Start of Assistant ([12])'s Answer\]\n(.*?)\n\n\[The End", re.S)


def lima_judge(body: dict) -> Reply:
    """Rates an answer by its '[r=N]' marker, in LIMA's format (reasoning, the choice, the
    choice again); '[r=x]' gets prose without a choice; pairwise requests get '[s=N]' scores."""
    user = body["messages"][-1]["content"]
    if "[BEGIN DATA]" not in user:  # the pairwise judge, or a stage's probe
        answers = dict(PAIRWISE.findall(user))
        if "[s=" not in answers.get("1", ""):
            return Reply("5 5\nA probe.")
        s1, s2 = (re.search(r"\[s=([\d.]+)\]", answers[k]).group(1) for k in ("1", "2"))
        return Reply(f"{s1} {s2}\nExplained.")
    answer = SUBMISSION.search(user).group(1)
    marker = re.search(r"\[r=(\w)\]", answer)
    if marker is None or marker.group(1) == "x":
        return Reply("The submission is adequate, I would say.")
    return Reply(f"Step 1: the answer addresses the task.\nStep 2: it is clear.\n"
                 f"{marker.group(1)}\n{marker.group(1)}", prompt_tokens=700,
                 completion_tokens=30)


# ---- the prompt and its parse ----------------------------------------------------------------
def test_the_prompt_is_limas_template_and_the_choice_line_is_read() -> None:
    [message] = likert_messages("Name a fruit.", "An apple.")
    assert message["role"] == "user"
    assert message["content"].startswith("You are evaluating a response that has been "
                                         "submitted for a particular task")
    assert "[Task]: Name a fruit.\n***\n[Submission]: An apple.\n***\n" in message["content"]
    for level, name in enumerate(["Not helpful", "Somewhat helpful", "Moderately helpful",
                                  "Helpful", "Very helpful", "Highly helpful"], start=1):
        assert f'"{level}": "{name} - The generated text' in LIKERT_TEMPLATE
    assert LIKERT_TEMPLATE.endswith("repeat just the selected choice again by itself on a "
                                    "new line.")
    assert parse_likert("Reasoning...\nIt is detailed.\n5\n5") == 5
    assert parse_likert("Reasoning.\n\n4\n4.\n") == 4
    assert parse_likert("**Choice: 6**") == 6
    assert parse_likert("Rating: \u201c2\u201d") == 2
    assert parse_likert("3") == 3  # the offline grammar's whole answer
    assert parse_likert("It is 5 out of 6.") is None  # no line of its own
    assert parse_likert("Reasoning.\n7\n7") is None  # off the scale: never clipped
    assert parse_likert("1. Relevance: good\n2. Clarity: fine") is None  # a list, not a choice


# ---- the bootstrap interval -------------------------------------------------------------------
def test_bootstrap_interval_holds_the_mean_narrows_with_prompts_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    few = rng.integers(1, 7, size=20).astype(float)
    many = rng.integers(1, 7, size=2000).astype(float)
    low, high = bootstrap_ci(few, 2000, seed=0)
    many_low, many_high = bootstrap_ci(many, 2000, seed=0)
    assert low < few.mean() < high and many_low < many.mean() < many_high
    wide, narrow = high - low, many_high - many_low
    assert narrow < wide / 5  # 100 times the prompts: about a tenth of the width
    assert bootstrap_ci(few, 2000, seed=0) == (low, high)  # the same seed, the same interval
    assert bootstrap_ci(many, 2000, seed=1) != (many_low, many_high)  # the seed matters
    # about the normal interval's width, 2 * 1.96 * sd / sqrt(n)
    assert wide == pytest.approx(2 * 1.96 * few.std() / np.sqrt(few.size), rel=0.2)
    assert bootstrap_ci([4.0], 100) == (4.0, 4.0) and bootstrap_ci([], 100) is None


# ---- the stage on a loopback judge ---------------------------------------------------------
@flow(name="likert-test", task_runner=RayTaskRunner(), validate_parameters=False)
def likert_flow(run_id: str, config: GleanerConfig, items: list[Rated]) -> dict[str, Any]:
    from gleaner.store import Store

    store = Store(config.store.url)
    return rate_answers(store, run_id, config, "a-vs-b", items, 2)


def test_likert_stage_rates_samples_and_records_the_unparseable(prefect_api, ray_local,
                                                                tmp_path: Path) -> None:
    from gleaner import layout
    from gleaner.store import Store

    ratings = {("a", "t1", "p1"): (6, 5), ("a", "t1", "p2"): (2, 4), ("a", "t2", "p3"): (3, 3),
               ("b", "t1", "p1"): (1, 2), ("b", "t1", "p2"): ("x", 4), ("b", "t2", "p3"): (5, 6)}
    items = [Rated(model, test_set, key, sample, f"Question {key}?",
                   f"answer {model}{sample} [r={rating}]")
             for (model, test_set, key), pair in ratings.items()
             for sample, rating in enumerate(pair)]
    store = Store(str(tmp_path / "store"))
    config = GleanerConfig().with_overrides({"store.url": store.url,
                                             "evaluate.likert.max_failed_share": 0.5,
                                             "evaluate.likert.resources.batch_size": 8})
    with OpenAIStub(lima_judge) as stub:
        config = config.with_overrides({"evaluate.endpoint.base_url": stub.base_url,
                                        "evaluate.endpoint.model": "gpt-3.5-turbo"})
        summary = likert_flow(run_id="lk", config=config, items=items)
        asked = list(stub.requests)
        again = likert_flow(run_id="lk", config=config, items=items)
        assert stub.count() == len(asked)  # every rating from the store: not even a probe
    rating_requests = [b for b in asked if "[BEGIN DATA]" in b["messages"][-1]["content"]]
    assert len(rating_requests) == 11 + 3  # the unparseable one asked 1 + parse_retries times
    assert all(b["temperature"] == 0 and b["max_tokens"] == 512 and "grammar" not in b
               for b in rating_requests)
    a, b = summary["models"]["a"], summary["models"]["b"]
    assert a["test_sets"]["t1"]["mean"] == pytest.approx(((6 + 5) / 2 + (2 + 4) / 2) / 2)
    assert a["test_sets"]["t2"] == {"mean": 3.0, "ci_low": 3.0, "ci_high": 3.0, "prompts": 1,
                                    "rated": 2, "failed": 0}
    assert b["test_sets"]["t1"]["mean"] == pytest.approx(((1 + 2) / 2 + 4) / 2)
    assert (b["test_sets"]["t1"]["rated"], b["test_sets"]["t1"]["failed"]) == (3, 1)
    assert a["overall"]["mean"] == pytest.approx((5.5 + 3 + 3) / 3, abs=1e-4)  # rounded
    for result in (a, b):
        for part in (*result["test_sets"].values(), result["overall"]):
            assert part["ci_low"] <= part["mean"] <= part["ci_high"]
    rated = sum(p["rated"] for r in (a, b) for p in r["test_sets"].values())
    failed = sum(p["failed"] for r in (a, b) for p in r["test_sets"].values())
    assert (rated, failed) == (11, 1) and rated + failed == len(items)
    assert summary["prompt_tokens"] > 0 and summary["cost_usd"] is not None
    assert again["models"] == summary["models"]
    assert "| b | t1 | 2.75 |" in summary["markdown"]
    rows = store.read_stage("lk", layout.likert_stage("a-vs-b")).to_pylist()
    [bad] = [r for r in rows if r["status"] == "failed"]
    assert (bad["model"], bad["key"], bad["sample"], bad["rating"]) == ("b", "p2", 0, None)
    assert bad["error_kind"] == "parse" and bad["attempts"] == 3
    assert bad["raw"] == "The submission is adequate, I would say."
    good = next(r for r in rows if (r["model"], r["key"], r["sample"]) == ("a", "p1", 1))
    assert (good["status"], good["rating"], good["raw"].splitlines()[-1]) == ("ok", 5, "5")


# ---- the CLI ----------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_evaluate_likert_reports_mean_and_interval_per_model(prefect_api, ray_local,
                                                                tmp_path: Path) -> None:
    from gleaner.flows.cli import app

    a = write_jsonl(tmp_path / "curated.jsonl", [
        {"prompt": "Hi", "answer": "hello [s=8] [r=5]", "test_set": "vicuna"},
        {"prompt": "Hi", "answer": "hey there [s=7] [r=6]", "test_set": "vicuna"},  # 2nd sample
        {"prompt": "2+2?", "answer": "4 [s=9] [r=4]", "test_set": "vicuna"},
        {"prompt": "Tea?", "answer": "Yes [s=6] [r=3]", "test_set": "koala"}])
    b = write_jsonl(tmp_path / "random.jsonl", [
        {"prompt": "Hi", "answer": "yo [s=6] [r=2]"},
        {"prompt": "Hi", "answer": "sup [s=5] [r=x]"},  # never a choice: a failed rating
        {"prompt": "2+2?", "answer": "5 [s=2] [r=1]"},
        {"prompt": "Tea?", "answer": "No [s=3] [r=2]"}])
    settings = tmp_path / "gleaner.yaml"
    settings.write_text("evaluate:\n  likert:\n    max_failed_share: 0.5\n")
    runner = CliRunner()
    with OpenAIStub(lima_judge) as stub:
        args = ["evaluate", "--answers-a", a, "--answers-b", b, "--judge-base-url",
                stub.base_url, "--store", str(tmp_path / "store"), "--run-id", "cli-likert",
                "--config", str(settings), "--likert"]
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        human = runner.invoke(app, args)
        assert human.exit_code == 0, human.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_sets"]["vicuna"]["win"] == 3  # the pairwise evaluation is still there
    likert = summary["likert"]
    curated, rand = likert["models"]["curated"], likert["models"]["random"]
    assert curated["test_sets"]["vicuna"]["mean"] == pytest.approx(((5 + 6) / 2 + 4) / 2)
    assert (curated["test_sets"]["vicuna"]["prompts"], curated["test_sets"]["vicuna"]["rated"]) \
        == (2, 3)
    assert curated["test_sets"]["koala"]["mean"] == 3.0
    assert rand["test_sets"]["vicuna"] == {**rand["test_sets"]["vicuna"], "mean": 1.5,
                                           "rated": 2, "failed": 1}
    assert curated["overall"]["ci_low"] <= curated["overall"]["mean"] <= \
        curated["overall"]["ci_high"]
    assert likert["judge_model"] == "gpt-4" and likert["resamples"] == 2000
    assert "Absolute evaluation: LIMA's 6-point helpfulness" in human.stdout
    assert "| curated | vicuna | 4.75 |" in human.stdout
    report = (tmp_path / "store" / "runs" / "cli-likert" / "evaluate" / "curated-vs-random"
              / "report.md").read_text()
    assert "| random | vicuna | 1.50 |" in report and "| win | tie | lose |" in report
    record = json.loads((tmp_path / "store" / "runs" / "cli-likert" / "run.json").read_text())
    assert record["evaluate"]["curated-vs-random"]["likert"]["curated"]["mean"] == \
        curated["overall"]["mean"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the flow's markdown artifact holds it too
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["evaluate-cli-likert-curated-vs-random"])))
    assert artifacts and "| random | vicuna | 1.50 |" in max(
        artifacts, key=lambda a: a.created).data


def test_cli_refuses_likert_samples_with_greedy_answers(tmp_path: Path) -> None:
    from gleaner.flows.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--likert", "--likert-samples", "3",
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 2 and "set evaluate.generation.do_sample: true" in result.output


# ---- N sampled answers from a real model --------------------------------------------------------
@pytest.mark.slow
def test_flow_rates_n_sampled_answers_of_two_tiny_models(
        prefect_api, ray_local, tiny_model_dir: Path, smol_tokenizer_dir: Path,
        tmp_path: Path) -> None:
    """Sample 0 is the answer the pairwise judge sees; samples 1.. are other draws (seeded),
    written beside it and rated as rows of their own."""
    from gleaner import layout
    from gleaner.flows.evaluate_flow import evaluate_flow
    from gleaner.store import Store

    other = build_tiny_model(smol_tokenizer_dir, tmp_path / "other-model", seed=1)
    prompts = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Name a fruit."}, {"prompt": "Say something about the sea."}])

    def constant(body: dict) -> Reply:
        user = body["messages"][-1]["content"]
        return Reply("Fine.\n4\n4" if "[BEGIN DATA]" in user else "6 6\nEqual.")

    with OpenAIStub(constant) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": str(tmp_path / "store"), "evaluate.endpoint.base_url": stub.base_url,
            "evaluate.generation.max_tokens": 8, "evaluate.generation.do_sample": True,
            "evaluate.generation.temperature": 1.0, "evaluate.likert.enabled": True,
            "evaluate.likert.samples": 3})
        summary = evaluate_flow(run_id="n-run", config=config, model_a=str(tiny_model_dir),
                                model_b=str(other), test_sets=[prompts])
        rated = [b for b in stub.requests if "[BEGIN DATA]" in b["messages"][-1]["content"]]
    store = Store(str(tmp_path / "store"))
    assert len(rated) == 2 * 2 * 3  # two models, two prompts, three samples
    for label in (summary["model_a"], summary["model_b"]):
        part = summary["likert"]["models"][label]["test_sets"]["mine"]
        assert (part["mean"], part["prompts"], part["rated"], part["failed"]) == (4.0, 2, 6, 0)
        first = store.dataset([layout.answers_path(store, "n-run", label, "mine")]).to_table()
        samples = store.dataset([layout.sampled_answers_path(store, "n-run", label, "mine")]
                                ).to_table().to_pylist()
        assert sorted(r["sample"] for r in samples) == [0, 0, 1, 1, 2, 2]
        by_sample = {(r["id"], r["sample"]): r["answer"] for r in samples}
        assert [by_sample[(i, 0)] for i in first.column("id").to_pylist()] == \
            first.column("answer").to_pylist()
        # at temperature 1 a 2-layer random model's draws differ
        assert len({by_sample[(i, k)] for i in first.column("id").to_pylist()
                    for k in range(3)}) > 2


# ---- the offline judge ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_offline_smollm2_judge_rates_under_the_grammar() -> None:
    """The llama.cpp server gleaner starts (SmolLM2-135M) answers LIMA's prompt with a digit
    1-6 under the grammar: every rating parses at the first attempt."""
    import asyncio

    from gleaner.engine.llm_rows import RowCost, ask
    from gleaner.llm.client import LLMClient
    from gleaner.llm.offline import offline_endpoints
    from gleaner.tasks.evaluate.likert import likert_call, likert_settings

    answers = [("How can I improve my time management skills?",
                "Set clear goals, prioritise tasks, block time in a calendar and review weekly."),
               ("What is the capital of France?", "Bananas are yellow.")]
    with offline_endpoints(GleanerConfig(), "judge") as live:
        settings = likert_settings(live)
        assert settings.grammar and settings.max_tokens == 4

        async def rate() -> list[tuple[Any, RowCost]]:
            async with LLMClient(live.evaluate.endpoint, concurrency=2) as client:
                out = []
                for question, answer in answers:
                    cost = RowCost()
                    out.append((await ask(client, likert_call(question, answer, settings),
                                          settings.parse_retries, cost), cost))
                return out

        readings = asyncio.run(rate())
    for reading, cost in readings:
        assert reading.value in range(1, 7) and cost.attempts == 1, reading.raw
        assert reading.raw.strip() == str(reading.value)


def test_the_cost_plan_counts_both_models_samples() -> None:
    from gleaner.tasks.cost.plan import plan_likert

    base = GleanerConfig().with_overrides({
        "evaluate.test_sets": ["koala"], "evaluate.limit": 3,
        "evaluate.endpoint.base_url": "http://127.0.0.1:1/v1",
        "evaluate.generation.do_sample": True})
    assert plan_likert(base) == []  # not asked for: nothing planned
    [plan] = plan_likert(base.with_overrides({"evaluate.likert.enabled": True,
                                              "evaluate.likert.samples": 5}))
    assert (plan.stage, plan.model) == ("evaluate/curated-vs-baseline/likert/ratings", "gpt-4")
    assert (plan.requests, plan.completion_tokens) == (2 * 3 * 5, 2 * 3 * 5 * 512)
    assert plan.prompt_tokens > 2 * 3 * 5 * 256  # the template and each answer's cap
    assert plan.priced and plan.sync_usd > 0
