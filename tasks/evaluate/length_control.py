"""A length-controlled win rate: what the judge's preference would be at equal answer lengths.

AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval") fits a logistic model of
the judge's preference for the model over the baseline with the answers' length difference
as a regressor, and reports the predicted win rate with that difference set to zero. Here,
per judged pair: ``y`` = 1 when A won, 0 when B won, a tie counts half each way; the
regressor is AlpacaEval's ``tanh(d / sd(d))`` of the length difference ``d = len(A) -
len(B)`` in characters; ``logit P(A wins) = b0 + b1 x``, fitted by Newton's method with a
small ridge penalty (a judge that always prefers the longer answer separates the data
perfectly, and the penalty keeps the fit finite). The length-controlled win rate is
``sigmoid(b0)``, the raw one the mean of ``y``. A judge whose preference is all length
gives about 50 %; one that ignores length gives about the raw rate. (AlpacaEval's own model
also has a per-instruction difficulty term, fitted over many models; with one pair of models
there is nothing to fit it on.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RIDGE = 1e-3  # on the slope only: the intercept (the answer) is not shrunk
OUTCOME = {"win": 1.0, "lose": 0.0, "tie": 0.5}


@dataclass(frozen=True)
class LengthControlled:
    """The raw and the length-controlled win rate of A over B (0-1), and the fit's slope."""

    win_rate: float | None
    lc_win_rate: float | None
    length_slope: float | None
    pairs: int

    def as_dict(self) -> dict[str, float | None]:
        return {"win_rate": _round(self.win_rate), "lc_win_rate": _round(self.lc_win_rate)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def length_controlled(verdicts: Sequence[str | None], length_a: Sequence[int],
                      length_b: Sequence[int], iterations: int = 50) -> LengthControlled:
    """The win rates of the judged pairs (verdicts ``win``/``tie``/``lose``; failed ones and
    None are left out)."""
    keep = [i for i, v in enumerate(verdicts) if v in OUTCOME]
    if not keep:
        return LengthControlled(None, None, None, 0)
    y = np.array([OUTCOME[verdicts[i]] for i in keep])  # type: ignore[index]
    if y.min() == y.max():  # one outcome only: nothing for length to explain
        return LengthControlled(float(y.mean()), float(y.mean()), None, len(y))
    d = np.array([length_a[i] - length_b[i] for i in keep], dtype=np.float64)
    spread = d.std()
    x = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    design = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    penalty = np.diag([0.0, RIDGE * len(y)])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (y - p) - penalty @ beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return LengthControlled(float(y.mean()), float(1.0 / (1.0 + np.exp(-beta[0]))),
                            float(beta[1]), len(y))
