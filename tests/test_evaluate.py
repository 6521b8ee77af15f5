"""The evaluation flow end to end: `gleaner evaluate` on two answer files, and generation with
two real (tiny) models, judged by a loopback OpenAI-compatible server, reported in the store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.openai_server import OpenAIStub, Reply
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    build_tiny_model,
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)

ANSWER_RE = re.compile(r"\[The Start of Assistant ([12])'s Answer\]\n(.*?)\n\n\[The End", re.S)


def marker_judge(body: dict) -> Reply:
    """Scores each answer from its '[s=N]' marker, whatever position it is shown in."""
    answers = dict(ANSWER_RE.findall(body["messages"][1]["content"]))
    if "[s=" not in answers["1"]:  # the judge stage's probe request: any valid review
        return Reply("5 5\nA probe.")
    s1, s2 = (float(re.search(r"\[s=(-?[\d.]+)\]", answers[k]).group(1)) for k in ("1", "2"))
    if s1 < 0 or s2 < 0:
        return Reply("I cannot decide.")
    return Reply(f"{s1:g} {s2:g}\nExplained.", prompt_tokens=1000, completion_tokens=100)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_judges_answer_files_with_repeats_and_unmatched_rows(prefect_api, ray_local,
                                                                 tmp_path: Path):
    from gleaner.flows.cli import app

    a = write_jsonl(tmp_path / "curated.jsonl", [
        {"prompt": "Hi", "answer": "hello [s=8]", "test_set": "vicuna"},
        {"prompt": "Hi", "answer": "hey [s=5]", "test_set": "koala"},   # repeated prompt
        {"prompt": "2+2?", "answer": "4 [s=9]", "test_set": "vicuna"},
        {"prompt": "Only A", "answer": "x [s=9]", "test_set": "vicuna"},
        {"prompt": "Broken", "answer": "? [s=-1]", "test_set": "koala"},
    ])
    b = write_jsonl(tmp_path / "random.jsonl", [
        {"prompt": "2+2?", "answer": "5 [s=2]"},
        {"prompt": "Hi", "answer": "yo [s=6]"},
        {"prompt": "Hi", "answer": "sup [s=5]"},
        {"prompt": "Broken", "answer": "! [s=3]"},
        {"prompt": "Only B", "answer": "y [s=1]"},
    ])
    store = tmp_path / "store"
    runner = CliRunner()
    with OpenAIStub(marker_judge) as stub:
        # one of koala's two pairs is a judge failure: over the default 5 % budget
        settings = tmp_path / "gleaner.yaml"
        settings.write_text("evaluate:\n  max_failed_share: 1.0\n")
        args = ["evaluate", "--answers-a", a, "--answers-b", b, "--judge-base-url", stub.base_url,
                "--judge-model", "gpt-4", "--store", str(store), "--run-id", "eval-run", "--json",
                "--config", str(settings)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        requests = stub.count()
        # Same judgements, other rule: read back from the store, not asked again.
        again = runner.invoke(app, [*args, "--rule", "fastchat"])
        assert again.exit_code == 0, again.output
        assert stub.count() == requests
    assert summary["test_sets"]["vicuna"] == {
        "win": 2, "tie": 0, "lose": 0, "failed": 0, "winning_score": 2.0, "win_rate": 1.0,
        "lc_win_rate": 1.0, "prompt_tokens": 4000, "completion_tokens": 400, "cost_usd": 0.144}
    assert summary["overall"]["win_rate"] == pytest.approx((2 + 0.5) / 3, abs=1e-4)
    assert summary["overall"]["lc_win_rate"] is not None
    assert {k: summary["test_sets"]["koala"][k] for k in ("win", "tie", "lose", "failed")} == {
        "win": 0, "tie": 1, "lose": 0, "failed": 1}
    assert summary["overall"]["winning_score"] == pytest.approx((2 - 0) / 3 + 1, abs=1e-4)
    assert (summary["only_in_a"], summary["only_in_b"], summary["join_key"]) == (1, 1, "prompt")
    assert summary["rule"] == "alpagasus"
    human = runner.invoke(app, [a for a in args if a != "--json"])
    assert "| **overall** | 2 | 1 | 0 | 1 | 1.667 |" in human.stdout
    assert "unmatched rows: 1 only in A, 1 only in B" in human.stdout
    fastchat = json.loads(again.stdout.strip().splitlines()[-1])
    assert fastchat["rule"] == "fastchat" and fastchat["test_sets"]["vicuna"]["win"] == 2
    base = store / "runs" / "eval-run" / "evaluate" / "curated-vs-random"
    assert (base / "wtl.png").read_bytes().startswith(b"\x89PNG")
    report = (base / "report.md").read_text()
    assert "| vicuna | 2 | 0 | 0 | 0 | 2.000 | 100.0 % | 100.0 % |" in report
    assert "LC win rate" in report and "LC win rate" in human.stdout
    unmatched = json.loads((base / "unmatched.json").read_text())
    assert {(u["file"], u["prompt"]) for u in unmatched} == {("a", "Only A"), ("b", "Only B")}


def test_cli_refuses_half_an_answer_pair(tmp_path: Path) -> None:
    from gleaner.flows.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--answers-a", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 2 and "--answers-b" in result.output


@pytest.mark.slow
def test_flow_generates_with_two_models_and_judges(prefect_api, ray_local, tiny_model_dir: Path,
                                                   smol_tokenizer_dir: Path, shared_data: Path,
                                                   tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.flows.evaluate_flow import evaluate_flow
    from gleaner.layout import answers_path
    from gleaner.store import Store

    other = build_tiny_model(smol_tokenizer_dir, tmp_path / "other-model", seed=1)
    custom = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Name a fruit."}])

    def by_length(body: dict) -> Reply:  # a judge that prefers the longer answer
        answers = dict(ANSWER_RE.findall(body["messages"][1]["content"]))
        l1, l2 = len(answers["1"]), len(answers["2"])
        return Reply(f"{7 + (l1 > l2) - (l1 < l2)} {7 + (l2 > l1) - (l2 < l1)}\nLength.")

    with OpenAIStub(by_length) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": str(tmp_path / "store"), "evaluate.endpoint.base_url": stub.base_url,
            "evaluate.test_sets_dir": str(shared_data / "eval_sets"),
            "evaluate.generation.max_tokens": 12, "evaluate.generation.forward_batch_size": 2})
        summary = evaluate_flow(run_id="gen-run", config=config, model_a=str(tiny_model_dir),
                                model_b=str(other), test_sets=["vicuna", custom], limit=3)
        asked = stub.count()
        rerun = evaluate_flow(run_id="gen-run", config=config, model_a=str(tiny_model_dir),
                              model_b=str(other), test_sets=["vicuna", custom], limit=3)
        assert stub.count() == asked  # answers and judgements came from the store: no probe
        # B "retrained" in place: its stored answers are stale and must be regenerated.
        build_tiny_model(smol_tokenizer_dir, other, seed=2)
        store_b = Store(str(tmp_path / "store"))
        before = store_b.read_bytes(answers_path(store_b, "gen-run", rerun["model_b"], "mine"))
        evaluate_flow(run_id="gen-run", config=config, model_a=str(tiny_model_dir),
                      model_b=str(other), test_sets=["vicuna", custom], limit=3)
        after = store_b.read_bytes(answers_path(store_b, "gen-run", rerun["model_b"], "mine"))
        assert after != before  # a new model version was recorded with new answers
    store = Store(str(tmp_path / "store"))
    # both orders of 4 pairs, and one probe per test set's judge stage
    assert summary["prompts"] == {"vicuna": 3, "mine": 1} and asked == 2 * 4 + 2
    for test_set, count in (("vicuna", 3), ("mine", 1)):
        a = store.dataset([answers_path(store, "gen-run", summary["model_a"], test_set)]).to_table()
        b = store.dataset([answers_path(store, "gen-run", summary["model_b"], test_set)]).to_table()
        assert a.num_rows == b.num_rows == count
        # The oracle: with a consistent length judge, the longer answer wins in both orders.
        expected = {"win": 0, "tie": 0, "lose": 0}
        for x, y in zip(a.column("answer").to_pylist(), b.column("answer").to_pylist(),
                        strict=True):
            expected["win" if len(x) > len(y) else "lose" if len(x) < len(y) else "tie"] += 1
        got = summary["test_sets"][test_set]
        assert {k: got[k] for k in expected} == expected and got["failed"] == 0
    assert rerun["overall"] == summary["overall"]
    # Each model's answering and each test set's judging is its own task run in Prefect.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_task_runs()}
    assert {f"answer-{summary['model_a']}", f"answer-{summary['model_b']}"} <= names
    assert any("judge-vicuna-batch" in n for n in names)  # the judge stages' batch task runs
    assert any("judge-mine-batch" in n for n in names)


def test_judging_resumes_from_parts_and_reuses_judgements(prefect_api, ray_local,
                                                         tmp_path: Path) -> None:
    """The judge is an engine stage: a lost part is judged again (cache off), a new run with
    the same pairs asks the judge nothing but its probe (cache on)."""
    from gleaner import layout
    from gleaner.config import GleanerConfig
    from gleaner.flows.evaluate_flow import evaluate_flow
    from gleaner.store import Store

    def run_evaluate_answers(store, run_id, config, a, b):
        return evaluate_flow(run_id=run_id, config=config, answers_a=a, answers_b=b)

    rows_a = [{"prompt": f"Q{i}", "answer": f"a [s={8 if i % 2 else 4}]"} for i in range(5)]
    rows_b = [{"prompt": f"Q{i}", "answer": "b [s=6]"} for i in range(5)]
    a = write_jsonl(tmp_path / "a.jsonl", rows_a)
    b = write_jsonl(tmp_path / "b.jsonl", rows_b)
    store = Store(str(tmp_path / "store"))
    with OpenAIStub(marker_judge) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": store.url, "evaluate.endpoint.base_url": stub.base_url,
            "evaluate.resources.batch_size": 2})
        first = run_evaluate_answers(store, "resume-run", config, a, b)
        assert stub.count() == 1 + 2 * 5  # the probe, then both orders of 5 pairs
        stage = layout.judge_stage(first["comparison"], "answers")
        assert store.finished_parts("resume-run", stage) == {0, 1, 2}
        store.fs.rm(store.part_paths(store.stage_path("resume-run", stage))[1])
        no_cache = config.with_overrides({"evaluate.cache": False})
        again = run_evaluate_answers(store, "resume-run", no_cache, a, b)
        assert stub.count() == 1 + 2 * 5 + 1 + 2 * 2  # the lost part's 2 pairs only
        other = run_evaluate_answers(store, "other-run", config, a, b)
        assert stub.count() == 1 + 2 * 5 + 1 + 2 * 2 + 1  # all from the cache
    for summary in (first, again, other):
        part = summary["test_sets"]["answers"]
        assert (part["win"], part["tie"], part["lose"], part["failed"]) == (2, 0, 3, 0)
