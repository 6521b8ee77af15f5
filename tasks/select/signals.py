"""Selection signals: per-example numbers a selector can threshold or rank by. A registry.

Each signal names the stage that makes it and the column it is read from;
selection joins every signal whose stage the run has (by example id), and the
selection report draws a histogram per signal with its bins. A new signal (a
new stage's column) is one ``register("signal", ...)`` line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gleaner import layout
from gleaner.registry import register, registry


@dataclass(frozen=True)
class Signal:
    name: str  # the candidate column selectors see (--sort-by)
    stage: str  # the stage whose rows hold it
    column: str  # the column of that stage
    title: str  # for the report
    edges: tuple[float, ...]  # histogram bin edges
    labels: bool = False  # a list of labels per example (selectors read it; no histogram)

    def bins(self) -> np.ndarray:
        return np.asarray(self.edges, dtype=np.float64)


def _edges(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(round(v, 6)) for v in values)


# AlpaGasus ratings in 0.5 steps over [0, 5]; DEITA's c and q live in [1, 6], s = c*q in
# [1, 36] (more for multi-turn).
register("signal", "rating")(Signal("rating", layout.RATE, "score", "AlpaGasus rating",
                                    _edges(np.arange(0.0, 5.5 + 1e-9, 0.5) - 0.25)))
register("signal", "complexity")(Signal("complexity", layout.SCORE, "complexity",
                                        "DEITA complexity c", _edges(np.linspace(1, 6, 21))))
register("signal", "quality")(Signal("quality", layout.SCORE, "quality", "DEITA quality q",
                                     _edges(np.linspace(1, 6, 21))))
register("signal", "evol")(Signal("evol", layout.SCORE, "evol", "evol score s = c·q",
                                  _edges(np.linspace(1, 36, 36))))
# A reward model's scalar is unbounded; MoDS keeps reward > 0.0 (threshold selector, --sort-by
# reward --threshold 0.0). Values outside the bins count in the end bins.
register("signal", "reward")(Signal("reward", layout.REWARD, "reward", "reward-model score r",
                                    _edges(np.linspace(-6, 6, 25))))
# IFD = L(A|Q) / L(A): around 1 (above 1, the question does not help); Long-is-more's lengths.
register("signal", "ifd")(Signal("ifd", layout.IFD, "ifd", "IFD = L(A|Q) / L(A)",
                                 _edges(np.linspace(0.0, 1.5, 31))))
register("signal", "response_tokens")(Signal("response_tokens", layout.LENGTH,
                                             "response_tokens", "response length (tokens)",
                                             _edges(np.linspace(0, 2048, 33))))
register("signal", "response_chars")(Signal("response_chars", layout.LENGTH, "response_chars",
                                            "response length (characters)",
                                            _edges(np.linspace(0, 8192, 33))))


def signals() -> list[Signal]:
    return [signal for _, signal in registry("signal").items()]
