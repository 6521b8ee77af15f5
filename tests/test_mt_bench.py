"""MT-Bench the way FastChat runs it, against a loopback judge answering FastChat's single-grade
format: two-turn answers from a real (tiny) model, per-category means, references, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.openai_server import OpenAIStub, Reply
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)

QUESTION_IDS = [81, 82, 101, 111]  # writing x2, reasoning and math (graded with references)
UNPARSEABLE = (82, 2)  # the judge never gives this (question, turn) a [[rating]]
MULTI_TURN = "<|The Start of Assistant A's Conversation with User|>"


def rating(qid: int, turn: int) -> int:
    return (qid * 3 + turn) % 10 + 1


def questions(shared_data: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in
            (shared_data / "eval_sets" / "mt_bench_question.jsonl").read_text().splitlines()]
    return {r["question_id"]: r for r in rows if r["question_id"] in QUESTION_IDS}


def fastchat_judge(by_question: dict[int, dict]):
    """Grades each (question, turn) with a known rating, 'Rating: [[n]]' after prose."""

    def respond(body: dict) -> Reply:
        user = body["messages"][-1]["content"]
        turn = 2 if MULTI_TURN in user else 1
        found = [qid for qid, q in by_question.items() if q["turns"][0] in user]
        if not found:  # the stage's probe
            return Reply("Rating: [[5]]")
        if (found[0], turn) == UNPARSEABLE:
            return Reply("The answer is fine, I suppose.")
        return Reply(f"The assistant tried.\n\nRating: [[{rating(found[0], turn)}]]")

    return respond


@pytest.mark.slow
def test_mt_bench_two_turns_graded_like_fastchat(prefect_api, ray_local, tiny_model_dir: Path,
                                                 shared_data: Path, tmp_path: Path) -> None:
    from gleaner import layout
    from gleaner.config import GleanerConfig
    from gleaner.flows.mt_bench_flow import mt_bench_flow
    from gleaner.store import Store

    by_question = questions(shared_data)
    references = {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, (
        shared_data / "eval_sets" / "mt_bench" / "reference_answer_gpt-4.jsonl").read_text()
        .splitlines())}
    with OpenAIStub(fastchat_judge(by_question)) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": str(tmp_path / "store"), "evaluate.endpoint.base_url": stub.base_url,
            "evaluate.test_sets_dir": str(shared_data / "eval_sets"),
            "mt_bench.question_ids": QUESTION_IDS, "mt_bench.answers.max_tokens": 6,
            "mt_bench.max_failed_share": 0.5})
        summary = mt_bench_flow(run_id="mt", config=config, model=str(tiny_model_dir))
        asked = list(stub.requests)
        again = mt_bench_flow(run_id="mt", config=config, model=str(tiny_model_dir))
        assert stub.count() == len(asked)  # answers and grades from the store: not one request

    # exact means: the failed grade is counted apart, never averaged in
    graded = {(q, t): rating(q, t) for q in QUESTION_IDS for t in (1, 2) if (q, t) != UNPARSEABLE}
    categories = {"writing": [81, 82], "reasoning": [101], "math": [111]}
    for name, ids in categories.items():
        values = [v for (q, _), v in graded.items() if q in ids]
        assert summary["categories"][name]["mean"] == pytest.approx(sum(values) / len(values))
        assert summary["categories"][name]["failed"] == (1 if name == "writing" else 0)
    assert summary["overall"] == pytest.approx(sum(graded.values()) / len(graded))
    for turn in (1, 2):
        values = [v for (_, t), v in graded.items() if t == turn]
        assert summary["turns"][str(turn)] == pytest.approx(sum(values) / len(values))
    assert (summary["graded"], summary["failed"], summary["requests"]) == (7, 1, 8)
    assert again["overall"] == summary["overall"]

    store = Store(str(tmp_path / "store"))
    answers = {r["question_id"]: r for r in store.dataset([layout.mt_bench_answers_path(
        store, "mt", summary["model"])]).to_table().to_pylist()}
    grading = [b for b in asked if any(q["turns"][0] in b["messages"][-1]["content"]
                                       for q in by_question.values())]
    assert len(grading) == 7 + 3  # the unparseable grade was asked 1 + parse_retries times

    def request(qid: int, turn: int) -> dict:
        first = by_question[qid]["turns"][0]
        return next(b for b in grading if first in b["messages"][-1]["content"]
                    and (MULTI_TURN in b["messages"][-1]["content"]) == (turn == 2))

    for qid in QUESTION_IDS:
        second = request(qid, 2)["messages"][-1]["content"]
        # the second turn's request carries the model's own first answer, then the question
        assert (f"### Assistant A:\n{answers[qid]['answer_1']}\n\n### User:\n"
                f"{by_question[qid]['turns'][1]}") in second
        assert f"### Assistant A:\n{answers[qid]['answer_2']}" in second
    for turn in (1, 2):
        body = request(111, turn)
        user = body["messages"][-1]["content"]
        if turn == 1:
            assert f"[The Start of Reference Answer]\n{references[111][0]}\n" in user
        else:
            assert f"### Reference answer:\n{references[111][1]}\n" in user
        assert "reference answer" in body["messages"][0]["content"] + user
    assert "Reference" not in request(81, 1)["messages"][-1]["content"]
    assert request(81, 1)["messages"][0]["content"] == "You are a helpful assistant."
    assert request(81, 2)["messages"][0]["content"].startswith("Please act as an impartial")
    assert all(b["temperature"] == 0 for b in grading)
    grades = store.read_stage("mt", layout.mt_bench_grades_stage(summary["model"])).to_pylist()
    failed = [g for g in grades if g["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["rating"] is None
    assert failed[0]["error_kind"] == "parse" and failed[0]["raw"].startswith("The answer is")


def test_second_turn_prompt_follows_the_first_answer(tiny_model_dir: Path) -> None:
    """The generation prompt of turn 2 holds turn 1's question and the model's own answer."""
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.generation import PromptRenderer

    renderer = PromptRenderer(str(tiny_model_dir))
    first, second = renderer.conversation_prompts([
        [{"role": "user", "content": "Name a fruit."}],
        [{"role": "user", "content": "Name a fruit."},
         {"role": "assistant", "content": "A pear, of course."},
         {"role": "user", "content": "And a vegetable?"}]])
    assert first == renderer.prompts([EvalPrompt("t", "1", "Name a fruit.")])[0]
    assert re.search(r"Name a fruit\..*A pear, of course\..*And a vegetable\?", second, re.S)
