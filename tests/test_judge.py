"""The judge path against a real OpenAI-compatible HTTP server on loopback (OpenAIStub).

The stub plays a judge that reads both answers out of AlpaGasus' prompt and
scores them from a marker in each answer, so which answer sits in which
position is decided by our code, and the expected W/T/L follows from the rule.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from gleaner.config import EndpointConfig
from gleaner.tasks.evaluate.answers import AnswerRow, join_answers
from gleaner.tasks.evaluate.judge import (
    JUDGE_SYSTEM,
    JUDGE_USER_TEMPLATE,
    Judge,
    Pair,
    judge_messages,
    parse_scores,
)
from gleaner.tasks.evaluate.verdicts import tally
from tests.support.openai_server import OpenAIStub, Reply

SPEC = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"
ANSWER_RE = re.compile(r"\[The Start of Assistant ([12])'s Answer\]\n(.*?)\n\n\[The End", re.S)


def test_prompt_is_the_spec_text_verbatim() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    block = spec.split("User:\n\n", 1)[1].split("\n\nEach order gives", 1)[0]
    expected = "\n".join(line[4:] for line in block.splitlines())
    assert expected == JUDGE_USER_TEMPLATE
    assert f"System: `{JUDGE_SYSTEM}`" in spec.replace("\n", " ")


@pytest.mark.parametrize(
    ("review", "scores"),
    [
        ("8 6\nAssistant 1 was more detailed.", (8.0, 6.0)),
        ("8.5 9", (8.5, 9.0)),
        ("Assistant 1: 8 Assistant 2: 6\nbecause", (8.0, 6.0)),
        ("\n  7, 7  \nBoth fine.", (7.0, 7.0)),
        ("Scores: 8/10 6/10", (8.0, 6.0)),
    ],
)
def test_parse_accepts_score_lines(review: str, scores: tuple[float, float]) -> None:
    assert parse_scores(review) == scores


@pytest.mark.parametrize(
    "review",
    ["Assistant 1 is better than Assistant 2.", "8\n6", "8 6 7", "", "12 3", "I give 8 and 6"],
)
def test_parse_rejects_everything_else(review: str) -> None:
    assert parse_scores(review) is None


class ScriptedJudge:
    """Scores each answer from its '[q=N]' marker; a few questions behave badly on purpose."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()

    def __call__(self, body: dict) -> Reply:
        assert body["temperature"] == 0
        assert body["max_tokens"] == 1024
        assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
        user = body["messages"][1]["content"]
        answers = dict(ANSWER_RE.findall(user))
        first, second = answers["1"], answers["2"]
        question = user.split("\n", 2)[1]
        self.calls[(question, first)] += 1
        s1 = float(re.search(r"\[q=([\d.]+)\]", first).group(1))
        s2 = float(re.search(r"\[q=([\d.]+)\]", second).group(1))
        if question == "biased":  # pure position bias: always prefers Assistant 1
            return Reply("9 5\nThe first one.")
        if question == "win-then-tie" and "from-b" in first:
            return Reply("7 7\nEqual.")
        if question == "garbled":
            return Reply("Both assistants did well, but the first was more thorough.")
        if question == "flaky" and self.calls[(question, first)] == 1:
            return Reply("Let me think about this.\n8 6")
        return Reply(f"Assistant 1: {s1:g} Assistant 2: {s2:g}\nExplanation.",
                     prompt_tokens=100, completion_tokens=10)


def pairs() -> list[Pair]:
    def pair(question: str, a: float, b: float, test_set: str = "vicuna") -> Pair:
        return Pair(test_set, question, question, f"from-a [q={a:g}]", f"from-b [q={b:g}]")

    return [
        pair("clear-win", 8, 6),
        pair("clear-loss", 5, 7),
        pair("equal", 7, 7),
        pair("biased", 1, 1),
        pair("win-then-tie", 8, 6),
        pair("garbled", 8, 6),
        pair("flaky", 8, 6, test_set="koala"),
        pair("half-point", 8.5, 8, test_set="koala"),
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # win, lose, tie, tie (bias), win (win+tie), failed, win (after retry), win
        ("alpagasus", {"win": 4, "tie": 2, "lose": 1, "failed": 1}),
        # FastChat: win+tie disagreement becomes a tie.
        ("fastchat", {"win": 3, "tie": 3, "lose": 1, "failed": 1}),
    ],
)
def test_exact_wtl_against_loopback_judge(rule: str, expected: dict[str, int]) -> None:
    script = ScriptedJudge()
    with OpenAIStub(script) as stub:
        judge = Judge(EndpointConfig(base_url=stub.base_url, model="gpt-4", max_retries=0),
                      parse_retries=2)
        results = judge.judge(pairs(), rule=rule)
        requests = list(stub.requests)
    verdicts = {r.pair.key: r.verdict for r in results}
    got = tally(verdicts.values())
    assert {k: getattr(got, k) for k in expected} == expected
    assert verdicts["garbled"] == "failed"
    assert verdicts["biased"] == "tie"
    assert verdicts["clear-loss"] == "lose"
    # Both orders were asked, with A's answer first and then second.
    clear = [r for r in requests if "\nclear-win\n" in r["messages"][1]["content"]]
    firsts = sorted(ANSWER_RE.findall(c["messages"][1]["content"])[0][1] for c in clear)
    assert firsts == ["from-a [q=8]", "from-b [q=6]"]
    # garbled: each order asked 1 + 2 retries times, then recorded as a failure with its text.
    garbled = next(r for r in results if r.pair.key == "garbled")
    assert garbled.a_first.attempts == garbled.b_first.attempts == 3
    assert "unparseable" in garbled.as_row()["error"]
    assert garbled.a_first.raw.startswith("Both assistants")
    flaky = next(r for r in results if r.pair.key == "flaky")
    assert flaky.verdict == "win" and flaky.a_first.attempts == 2
    # Token accounting comes from the server's usage numbers.
    clear_row = next(r for r in results if r.pair.key == "clear-win").as_row()
    assert clear_row["prompt_tokens"] == 200 and clear_row["completion_tokens"] == 20


def test_server_errors_become_failures_with_a_key_free_message(monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-judge-key-123456")
    with OpenAIStub(lambda body: Reply(status=500)) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="gpt-4", max_retries=1,
                                  api_key_env="JUDGE_TEST_KEY")
        [result] = Judge(endpoint, parse_retries=1).judge([pairs()[0]])
        assert stub.count() == 4  # 2 orders x (1 try + 1 SDK retry); parse retries not used
    assert result.verdict == "failed"
    assert "500" in result.as_row()["error"]
    assert "sk-secret" not in result.as_row()["error"]


def test_messages_put_answers_in_the_stated_positions() -> None:
    system, user = judge_messages("Q?", "first answer", "second answer")
    assert system["content"] == JUDGE_SYSTEM
    assert dict(ANSWER_RE.findall(user["content"])) == {"1": "first answer", "2": "second answer"}


def test_answer_files_join_repeated_prompts_and_report_unmatched() -> None:
    a = [
        AnswerRow(1, "Hi", "a-hi-1"), AnswerRow(2, "Sum 2+2", "a-4"),
        AnswerRow(3, "Hi", "a-hi-2"), AnswerRow(4, "Only in A", "a-x"),
    ]
    b = [
        AnswerRow(1, "Hi", "b-hi-1"), AnswerRow(2, "Hi", "b-hi-2"),
        AnswerRow(3, "Sum 2+2", "b-4"), AnswerRow(4, "Only in B", "b-y"),
    ]
    joined = join_answers(a, b)
    assert joined.join_key == "prompt"
    matched = {(p.question, p.answer_a, p.answer_b) for p in joined.pairs}
    assert matched == {("Hi", "a-hi-1", "b-hi-1"), ("Hi", "a-hi-2", "b-hi-2"),
                       ("Sum 2+2", "a-4", "b-4")}
    assert [r.prompt for r in joined.only_a] == ["Only in A"]
    assert [r.prompt for r in joined.only_b] == ["Only in B"]
    report = joined.unmatched_report()
    assert {(r["file"], r["line"]) for r in report} == {("a", 4), ("b", 4)}


def test_answer_files_join_by_id_when_every_row_has_one() -> None:
    a = [AnswerRow(1, "Q1", "a1", id="1"), AnswerRow(2, "Q2", "a2", id="2")]
    b = [AnswerRow(1, "Q2 (reworded)", "b2", id="2"), AnswerRow(2, "Q1", "b1", id="1"),
         AnswerRow(3, "Q3", "b3", id="3")]
    joined = join_answers(a, b)
    assert joined.join_key == "id"
    assert {(p.answer_a, p.answer_b) for p in joined.pairs} == {("a1", "b1"), ("a2", "b2")}
    assert joined.prompt_mismatch == 1
    assert [r.id for r in joined.only_b] == ["3"] and not joined.only_a
