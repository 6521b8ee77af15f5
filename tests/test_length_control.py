"""The length-controlled win rate (AlpacaEval 2's method) on synthetic verdicts: a judge whose
preference is all length gives about 50 % however long A's answers are; a judge that ignores
length gives about the raw win rate; failed pairs are left out."""

from __future__ import annotations

import numpy as np
import pytest

from gleaner.tasks.evaluate.length_control import length_controlled


def lengths(rng: np.random.Generator, n: int, a_longer_by: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(50, 800, n) + a_longer_by, rng.integers(50, 800, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_judge_that_prefers_length_only_gives_about_fifty_percent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = lengths(rng, 3000, a_longer_by=250)  # A is much longer: the raw rate flatters it
    d = a - b
    prefers_a = 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))
    verdicts = ["win" if r < p else "lose" for r, p in zip(rng.random(3000), prefers_a,
                                                              strict=True)]
    result = length_controlled(verdicts, a, b)
    assert result.win_rate > 0.7  # length inflates the raw rate...
    assert result.lc_win_rate == pytest.approx(0.5, abs=0.06)  # ...and LC removes it
    assert result.length_slope > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_judge_that_ignores_length_gives_about_the_raw_rate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = lengths(rng, 3000, a_longer_by=250)
    draws = rng.random(3000)
    verdicts = ["win" if r < 0.7 else "tie" if r < 0.8 else "lose" for r in draws]
    result = length_controlled(verdicts, a, b)
    assert result.win_rate == pytest.approx(np.mean([{"win": 1, "tie": .5, "lose": 0}[v]
                                                     for v in verdicts]))
    assert result.lc_win_rate == pytest.approx(result.win_rate, abs=0.03)


def test_failed_pairs_are_left_out_and_none_judged_is_none() -> None:
    result = length_controlled(["win", "failed", None, "lose"], [10, 5, 5, 3], [3, 5, 5, 10])
    assert result.pairs == 2 and result.win_rate == 0.5
    empty = length_controlled(["failed"], [1], [2])
    assert (empty.win_rate, empty.lc_win_rate, empty.pairs) == (None, None, 0)


def test_one_outcome_only_is_its_own_rate() -> None:
    result = length_controlled(["win", "win"], [10, 20], [30, 5])
    assert (result.win_rate, result.lc_win_rate, result.length_slope) == (1.0, 1.0, None)
