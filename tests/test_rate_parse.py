"""The AlpaGasus prompt and score parser: real-looking answers, including the failing ones."""

from __future__ import annotations

import math

import pytest

from gleaner.llm.client import SCORE_TOKENS_0_5, SCORE_TOKENS_1_6, expected_score
from gleaner.tasks.rate.parse import parse_score
from gleaner.tasks.rate.prompt import SYSTEM_PROMPT, build_prompt

PARSED = [
    ("4.5", 4.5),
    ("5", 5.0),
    ("0", 0.0),  # a real zero is a score, not a failure
    ("Score: 4", 4.0),
    ("4/5", 4.0),
    ("**4**", 4.0),
    ("**Score: 3.5**", 3.5),
    ("Rating: 4.5 out of 5", 4.5),
    ("Accuracy: 2\nThe response misses the second half of the question.", 2.0),
    ("4.5\nThe response is accurate and complete, although it could cite sources.", 4.5),
    ("\n\n  3  \nExplanation follows.", 3.0),
    ("I would rate this response a 3 out of 5.", 3.0),
    ("Sure! Here is my evaluation.\nScore: 4\nThe answer is mostly right.", 4.0),
    ("5.0/5.0 — flawless", 5.0),
    ("4.\nGood.", 4.0),
]

FAILING = [
    ("", "empty"),
    ("   \n  ", "empty"),
    ("The response is excellent and fully accurate.", "no number"),
    ("Four out of five.", "no number"),
    ("N/A", "no number"),
    ("8/10", "outside"),
    ("Score: 7", "outside"),
    ("-1", "outside"),
    ("10\nPerfect answer.", "outside"),
]


@pytest.mark.parametrize(("answer", "score"), PARSED)
def test_parse_score_reads_the_first_line_with_a_number(answer: str, score: float) -> None:
    parsed = parse_score(answer)
    assert parsed.ok, parsed.reason
    assert parsed.score == score


@pytest.mark.parametrize(("answer", "why"), FAILING)
def test_unparseable_or_out_of_range_is_a_failure_never_zero(answer: str, why: str) -> None:
    parsed = parse_score(answer)
    assert parsed.score is None
    assert parsed.reason and why in parsed.reason


def test_prompt_is_the_papers_with_the_dimension_as_parameter() -> None:
    prompt = build_prompt("helpfulness")
    row = {"instruction": "Add {x} to 2.", "input": "x = 3", "output": "5"}
    messages = prompt.messages(row)
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    user = messages[1]["content"]
    expected = "###Instruction:\nAdd {x} to 2.\n\n### Input:\nx = 3\n\n### Response:\n5\n"
    assert user.startswith(expected)
    assert "according to the helpfulness of the response" in user
    assert "higher level of the helpfulness" in user
    assert "Please first output a single line containing value indicating the scores." in user
    # the version names the template, not the dimension (the dimension is its own key)
    assert build_prompt("accuracy").version == prompt.version


def test_template_file_replaces_the_user_message_and_changes_the_version(tmp_path) -> None:
    template = tmp_path / "rate.txt"
    template.write_text("Q: {instruction}\nA: {output}\nRate {dimension} 0-5. JSON like {\"a\": 1}")
    custom = build_prompt("relevance", template)
    user = custom.user_message({"instruction": "Hi", "input": "", "output": "Hello"})
    assert user == 'Q: Hi\nA: Hello\nRate relevance 0-5. JSON like {"a": 1}'
    assert custom.version != build_prompt("relevance").version
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate this: {output}")
    with pytest.raises(ValueError, match=r"\{instruction\}"):
        build_prompt("accuracy", bad)


def test_expected_score_renormalises_over_the_allowed_tokens() -> None:
    top = {"4": math.log(0.5), " 5": math.log(0.2), "5": math.log(0.1), "The": math.log(0.2)}
    # p(4)=0.5, p(5)=0.3 (two spellings), renormalised over 0.8
    assert expected_score(top, SCORE_TOKENS_0_5) == pytest.approx((4 * 0.5 + 5 * 0.3) / 0.8)
    assert expected_score({"The": -0.1, "I": -2.0}, SCORE_TOKENS_0_5) is None
    assert expected_score({"0": -0.2, "6": -0.1}, SCORE_TOKENS_1_6) == pytest.approx(6.0)
    assert expected_score(None, SCORE_TOKENS_0_5) is None
