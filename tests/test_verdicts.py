"""Combination rules over all nine pairs of per-order outcomes, both rules."""

from __future__ import annotations

import pytest

from gleaner.tasks.evaluate.verdicts import (
    Tally,
    combine,
    markdown_table,
    order_outcome,
    stacked_bar_png,
    tally,
    verdict,
)

# (A's outcome with A as Assistant 1, A's outcome with A as Assistant 2) -> combined verdict
ALPAGASUS = {
    ("win", "win"): "win",
    ("win", "tie"): "win",
    ("tie", "win"): "win",
    ("tie", "tie"): "tie",
    ("win", "lose"): "tie",
    ("lose", "win"): "tie",
    ("lose", "lose"): "lose",
    ("lose", "tie"): "lose",
    ("tie", "lose"): "lose",
}
FASTCHAT = {
    ("win", "win"): "win",
    ("win", "tie"): "tie",
    ("tie", "win"): "tie",
    ("tie", "tie"): "tie",
    ("win", "lose"): "tie",
    ("lose", "win"): "tie",
    ("lose", "lose"): "lose",
    ("lose", "tie"): "tie",
    ("tie", "lose"): "tie",
}


@pytest.mark.parametrize(("first", "second"), sorted(ALPAGASUS))
def test_alpagasus_rule(first: str, second: str) -> None:
    assert combine(first, second, "alpagasus") == ALPAGASUS[(first, second)]


@pytest.mark.parametrize(("first", "second"), sorted(FASTCHAT))
def test_fastchat_rule(first: str, second: str) -> None:
    assert combine(first, second, "fastchat") == FASTCHAT[(first, second)]


def test_the_rules_differ_exactly_on_win_tie_and_lose_tie() -> None:
    differing = {k for k in ALPAGASUS if ALPAGASUS[k] != FASTCHAT[k]}
    assert differing == {("win", "tie"), ("tie", "win"), ("lose", "tie"), ("tie", "lose")}


def test_second_order_puts_a_in_assistant_2() -> None:
    # Judge says Assistant 1 = 8, Assistant 2 = 6. In the second order A is Assistant 2: A lost.
    assert order_outcome(8, 6, a_is_assistant=1) == "win"
    assert order_outcome(8, 6, a_is_assistant=2) == "lose"
    assert order_outcome(7.5, 7.5, a_is_assistant=2) == "tie"


def test_a_judge_that_always_prefers_position_1_gives_ties() -> None:
    # Pure position bias: A wins as Assistant 1 and loses as Assistant 2 -> a tie, not a win.
    first = order_outcome(9, 5, a_is_assistant=1)
    second = order_outcome(9, 5, a_is_assistant=2)
    assert verdict(first, second, "alpagasus") == "tie"


def test_a_missing_order_is_a_failure_never_a_tie() -> None:
    assert verdict(None, "win", "alpagasus") == "failed"
    assert verdict("tie", None, "fastchat") == "failed"


def test_unknown_rule_and_outcome_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown combination rule"):
        combine("win", "win", "majority")
    with pytest.raises(ValueError, match="win/tie/lose"):
        combine("win", "draw", "alpagasus")


def test_winning_score_and_report() -> None:
    part = tally(["win", "win", "win", "tie", "lose", "failed"])
    assert (part.win, part.tie, part.lose, part.failed) == (3, 1, 1, 1)
    # (W - L) / N + 1 over the 5 judged pairs; failures are not in N.
    assert part.winning_score == pytest.approx((3 - 1) / 5 + 1)
    assert Tally().winning_score is None
    table = markdown_table({"vicuna": part}, "curated", "random", "alpagasus")
    assert "| vicuna | 3 | 1 | 1 | 1 | 1.400 |" in table
    assert "| **overall** | 3 | 1 | 1 | 1 | 1.400 |" in table
    png = stacked_bar_png({"vicuna": part, "koala": tally(["lose"])}, "curated", "random")
    assert png.startswith(b"\x89PNG")
