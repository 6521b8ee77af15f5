"""Exact similarities and per-group maxima: the two small steps the walk's checks share.

The walk's float32 check (tasks/select/deita_walk.py) and the witness index
(tasks/select/walk_index.py) end with a flat list of (row, selected row) pairs whose
float32 similarities must be reduced to each row's most similar selected row,
with near ties decided in float64, which is the definition's arithmetic.
"""

from __future__ import annotations

import numpy as np


def exact_similarities(S: np.ndarray, cand: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64 similarities of the rows ``cand`` of S with ``x``: the definition's values."""
    return S[cand].astype(np.float64) @ x.astype(np.float64)


def best_per_group(
    vals: np.ndarray, cols: np.ndarray, starts: np.ndarray, counts: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of consecutive pairs (``starts``, ``counts``, none empty): the float32 maximum,
    the first column reaching it, and how many pairs lie within 2·eps of it (> 1: a near tie)."""
    top = np.maximum.reduceat(vals, starts)
    rep = np.repeat(top, counts)
    group = np.repeat(np.arange(starts.size), counts)
    first = np.flatnonzero(vals == rep)
    _, at = np.unique(group[first], return_index=True)
    near = np.add.reduceat((vals >= rep - 2 * eps).astype(np.int64), starts)
    return top, cols[first[at]], near
