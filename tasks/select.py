"""Selectors: which examples make the curated set, and why every other one does not.

Every selector returns a :class:`Manifest` with one row per candidate example:
``selected`` and a ``reason`` drawn from a closed vocabulary (``kept``,
``below_threshold``, ``too_similar:<id of the selected neighbour>``,
``over_budget``, ``failed_upstream``), so the counts always add up to the pool.

The ``deita`` selector implements DEITA's score-first, diversity-aware walk
(SPEC §2) exactly: sort by score descending (ties by id), add an example only
if its cosine similarity to every already-selected example is <= tau, stop at
the budget. It computes that walk with blocked matrix products instead of one
row at a time; see :func:`deita_walk` for why the result is identical.

No Prefect, no Ray, no paths: plain numpy and pyarrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

KEPT = "kept"
BELOW_THRESHOLD = "below_threshold"
TOO_SIMILAR = "too_similar"
OVER_BUDGET = "over_budget"
FAILED_UPSTREAM = "failed_upstream"
REASONS = (KEPT, BELOW_THRESHOLD, TOO_SIMILAR, OVER_BUDGET, FAILED_UPSTREAM)

# Walk outcome codes (input order), used by deita_walk.
CODE_KEPT, CODE_TOO_SIMILAR, CODE_OVER_BUDGET, CODE_FAILED = 0, 1, 2, 3

# A float32 dot product of two float32 unit vectors of dimension d is within
# gamma_d = d*u/(1-d*u) (u = 2**-24) of the exact value; 1e-4 bounds that for
# d <= ~1600 with room to spare. Anything closer than this to tau (or to a row's
# maximum) is decided in float64 instead.
FLOAT32_MARGIN = 1e-4

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("selected", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("rank", pa.int64()),
        pa.field("selector", pa.string(), nullable=False),
    ]
)


@dataclass
class Manifest:
    """One selector's verdict on every candidate, in the candidates' order.

    ``score`` is the sort key (or thresholded value) the deciding selector used;
    ``rank`` is the position in that selector's walk (None where it did not walk).
    """

    ids: list[str]
    score: np.ndarray
    selected: np.ndarray
    reason: list[str]
    rank: np.ndarray  # int64, -1 = none
    selector: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.selector:
            self.selector = [""] * n
        for name in ("score", "selected", "rank"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"manifest column {name} does not have {n} rows")
        if len(self.reason) != n or len(self.selector) != n:
            raise ValueError("manifest reason/selector length differs from ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def selected_ids(self) -> list[str]:
        """Selected ids in selection order (ranks are unique within a selector)."""
        idx = np.flatnonzero(self.selected)
        idx = idx[np.argsort(self.rank[idx], kind="stable")]
        return [self.ids[i] for i in idx]

    def counts(self) -> dict[str, int]:
        """Counts per reason family (``too_similar:<id>`` counted as ``too_similar``)."""
        counts = dict.fromkeys(REASONS, 0)
        for reason in self.reason:
            counts[reason.split(":", 1)[0]] += 1
        return counts

    def to_table(self) -> pa.Table:
        score = np.asarray(self.score, dtype=np.float64)
        rank = np.asarray(self.rank, dtype=np.int64)
        return pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "score": pa.array(score, pa.float64(), mask=~np.isfinite(score)),
                "selected": pa.array(np.asarray(self.selected, dtype=bool), pa.bool_()),
                "reason": pa.array(self.reason, pa.string()),
                "rank": pa.array(rank, pa.int64(), mask=rank < 0),
                "selector": pa.array(self.selector, pa.string()),
            },
            schema=MANIFEST_SCHEMA,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> Manifest:
        score = table.column("score").to_numpy(zero_copy_only=False)
        rank = table.column("rank").fill_null(-1).to_numpy(zero_copy_only=False)
        return cls(
            ids=table.column("id").to_pylist(),
            score=np.asarray(score, dtype=np.float64),
            selected=np.asarray(table.column("selected").to_numpy(zero_copy_only=False), bool),
            reason=table.column("reason").to_pylist(),
            rank=np.asarray(rank, dtype=np.int64),
            selector=table.column("selector").to_pylist(),
        )


# ---- helpers ---------------------------------------------------------------
def _as_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scores as float64 with None/NaN/inf meaning "no score" (the example failed upstream)."""
    values = np.array([np.nan if s is None else s for s in scores], dtype=np.float64) if not (
        isinstance(scores, np.ndarray)
    ) else scores.astype(np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    return values


def score_order(ids: Sequence[str], scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices of ``candidates`` sorted by score descending, ties broken by id ascending.

    Only tied runs are sorted by id (comparing Python strings is the slow part).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        return candidates
    keys = -scores[candidates]
    order = candidates[np.argsort(keys, kind="stable")]
    sorted_keys = -scores[order]
    starts = np.flatnonzero(np.diff(sorted_keys) == 0)
    if starts.size == 0:
        return order
    # Runs of equal scores: [a, b) where b is the first index with another score.
    boundaries = np.flatnonzero(np.diff(sorted_keys) != 0) + 1
    edges = np.concatenate([[0], boundaries, [order.size]])
    lengths = np.diff(edges)
    for a, b in zip(edges[:-1][lengths > 1], edges[1:][lengths > 1], strict=True):
        run = order[a:b]
        run_ids = np.array([ids[i] for i in run], dtype=object)
        order[a:b] = run[np.argsort(run_ids, kind="stable")]
    return order


def unit_rows(vectors: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows, and a mask of rows that could be normalised.

    Normalisation happens in float64 and is rounded once to float32: these
    float32 unit vectors *are* the vectors the selection is defined on, so the
    reference loop and the blocked walk see identical inputs. Zero or non-finite
    rows have no direction (no cosine): they are reported, not guessed.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {vectors.shape}")
    out = np.empty(vectors.shape, dtype=np.float32)
    ok = np.ones(len(vectors), dtype=bool)
    for start in range(0, len(vectors), chunk):
        block = vectors[start : start + chunk].astype(np.float64)
        finite = np.isfinite(block).all(axis=1)
        norms = np.sqrt(np.einsum("ij,ij->i", np.where(finite[:, None], block, 0.0),
                                  np.where(finite[:, None], block, 0.0)))
        good = finite & (norms > 0)
        safe = np.where(good, norms, 1.0)
        out[start : start + chunk] = np.where(good[:, None], block / safe[:, None], 0.0)
        ok[start : start + chunk] = good
    return out, ok


# ---- the DEITA walk ---------------------------------------------------------
@dataclass
class WalkResult:
    """Outcome of :func:`deita_walk` for the rows it was given, in that order."""

    code: np.ndarray  # CODE_* per row
    neighbour: np.ndarray  # row index of the selected neighbour (too_similar), else -1
    selected_order: np.ndarray  # row indices in selection order


BF16_MARGIN = 0.02
# |bf16 product - exact| <= 2**-8 * sum|x_i y_i| (inputs rounded) + 2**-9 (output rounded)
# + fp32 accumulation ~ 0.0062 for unit vectors; candidates within 0.02 of what could
# matter are recomputed, which covers twice that error plus the float32 margin.
def _against_selected_f32(
    X: np.ndarray, S: np.ndarray, S64: np.ndarray, tau: float, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of X rejected against S, their most similar column, and that similarity."""
    size = len(X)
    cols = np.full(size, -1, dtype=np.int64)
    best_val = np.full(size, -np.inf)
    G = X @ S.T
    rows = np.arange(size)
    best = G.argmax(axis=1)
    rowmax32 = G[rows, best]
    rowmax = rowmax32.astype(np.float64)  # compare in float64: no gaps between the cases
    rejected = rowmax > tau + eps
    for r in np.flatnonzero(~rejected & (rowmax >= tau - eps)):  # borderline rows, exactly
        sims = S64 @ X[r].astype(np.float64)
        if sims.max() > tau:
            rejected[r] = True
            cols[r] = int(np.argmax(sims))
            best_val[r] = sims.max()
    todo = np.flatnonzero(rejected & (cols < 0))
    if todo.size:
        cols[todo] = best[todo]
        best_val[todo] = rowmax[todo]
        # Second-best per row in one pass (G is scratch): near-tied maxima are rare.
        G[rows, best] = -np.inf
        second = G.max(axis=1) if G.shape[1] > 1 else np.full(size, -np.inf, np.float32)
        for r in todo[second[todo] >= rowmax32[todo] - 2 * eps]:  # decide in float64
            cand = np.union1d(np.flatnonzero(G[r] >= rowmax32[r] - 2 * eps), [best[r]])
            cols[r] = _refined_argmax(X[r].astype(np.float64), cand, S64)
    return rejected, cols, best_val


def _against_selected_bf16(
    X: np.ndarray, S_bf16: Any, S: np.ndarray, S64: np.ndarray, tau: float, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As _against_selected_f32, screening in bfloat16 and recomputing the band in float32."""
    import torch

    size = len(X)
    cols = np.full(size, -1, dtype=np.int64)
    best_val = np.full(size, -np.inf)
    rejected = np.zeros(size, dtype=bool)
    Gb = torch.from_numpy(X).to(torch.bfloat16) @ S_bf16.T
    rowmax_b = Gb.amax(dim=1).float().numpy()
    need = np.flatnonzero(rowmax_b >= tau - BF16_MARGIN)
    if not need.size:
        return rejected, cols, best_val
    floor = np.minimum(rowmax_b[need], tau) - BF16_MARGIN
    sub = Gb.index_select(0, torch.from_numpy(need)).float()
    r_loc, c = torch.nonzero(sub >= torch.from_numpy(floor)[:, None], as_tuple=True)
    r_loc, c = r_loc.numpy(), c.numpy()
    rows = need[r_loc]
    vals = np.einsum("ij,ij->i", X[rows], S[c])
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    counts = np.diff(np.r_[starts, rows.size])
    group_rows = rows[starts]
    gmax32 = np.maximum.reduceat(vals, starts)
    gmax = gmax32.astype(np.float64)  # compare in float64: no gaps between the cases
    rep = np.repeat(gmax32, counts)
    first = np.flatnonzero(vals == rep)
    group_of = np.repeat(np.arange(starts.size), counts)
    _, first_idx = np.unique(group_of[first], return_index=True)
    argcol = c[first[first_idx]]
    near = np.add.reduceat((vals >= rep - 2 * eps).astype(np.int64), starts)
    over = gmax > tau + eps
    hard = (~over & (gmax >= tau - eps)) | (over & (near > 1))
    sure = over & ~hard
    rejected[group_rows[sure]] = True
    cols[group_rows[sure]] = argcol[sure]
    best_val[group_rows[sure]] = gmax[sure]
    for g in np.flatnonzero(hard):  # borderline or near-tied: decide in float64
        cand = c[starts[g] : starts[g] + counts[g]]
        sims = S64[cand] @ X[group_rows[g]].astype(np.float64)
        if sims.max() > tau:
            r = group_rows[g]
            rejected[r] = True
            cols[r] = int(cand[int(np.argmax(sims))])
            best_val[r] = sims.max()
    return rejected, cols, best_val


def _refined_argmax(x64: np.ndarray, cand: np.ndarray, S64: np.ndarray) -> int:
    """Exact (float64) argmax among near-tied candidate columns; first in selection order wins."""
    if cand.size == 1:
        return int(cand[0])
    sims = S64[cand] @ x64
    return int(cand[int(np.argmax(sims))])


def _lower_gram(Xs: np.ndarray, tile: int = 256) -> np.ndarray:
    """Xs @ Xs.T below the diagonal only (the walk never looks above it): half the flops."""
    m = len(Xs)
    W = np.zeros((m, m), dtype=np.float32)
    for i0 in range(0, m, tile):
        i1 = min(m, i0 + tile)
        W[i0:i1, :i1] = Xs[i0:i1] @ Xs[:i1].T
    return W


def _nearer_in_block(
    X: np.ndarray,
    S64: np.ndarray,
    S_rows: np.ndarray,
    pos: int,
    rejected: np.ndarray,
    accepted: np.ndarray,
    best_val: np.ndarray,
    neighbour: np.ndarray,
    eps: float,
) -> None:
    """A row rejected against S may be even closer to a row accepted earlier in its block.

    The sequential walk would have compared it with that row too, so its
    neighbour is the most similar among S *and* the block's earlier acceptances.
    """
    rej = np.flatnonzero(rejected)
    acc = np.flatnonzero(accepted)
    if not rej.size or not acc.size:
        return
    rej = rej[rej > acc[0]]
    if not rej.size:
        return
    H = X[rej] @ X[acc].T
    H[acc[None, :] >= rej[:, None]] = -np.inf  # only rows accepted before it count
    top = H.max(axis=1)
    for j in np.flatnonzero(top >= best_val[rej] - 2 * eps):
        r = int(rej[j])
        if top[j] > best_val[r] + 2 * eps:
            near = acc[H[j] >= top[j] - 2 * eps]
            if near.size == 1:
                neighbour[pos + r] = pos + int(near[0])
                best_val[r] = top[j]
                continue
        # Too close to call in float32: decide over S and the earlier acceptances exactly.
        x64 = X[r].astype(np.float64)
        earlier = acc[acc < r]
        sims = np.concatenate([S64 @ x64, X[earlier].astype(np.float64) @ x64])
        best = int(np.argmax(sims))
        neighbour[pos + r] = S_rows[best] if best < len(S_rows) else pos + int(
            earlier[best - len(S_rows)])
        best_val[r] = sims[best]


def usable_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows with a direction (finite, not all zero), checked in one cheap float32 pass."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {vectors.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", vectors, vectors)
    ok = np.isfinite(sq) & (sq > 0)
    for r in np.flatnonzero(~ok):  # overflow or underflow in float32: decide exactly
        ok[r] = bool(unit_rows(vectors[r : r + 1])[1][0])
    return ok


def deita_walk(
    vectors: np.ndarray,
    order: np.ndarray,
    budget: int,
    tau: float,
    block_size: int = 2048,
    min_block: int = 64,
    screen: str = "f32",
) -> WalkResult:
    """DEITA's sequential walk over ``vectors[order]``, computed blockwise.

    Positions in the result (codes, neighbours, selection order) index ``order``.

    The definition (SPEC §2): walk the rows in order; row r joins S iff
    ``max_{s in S} <u_r, u_s> <= tau`` (similarity = float64 dot product of the
    float32 unit vectors of :func:`unit_rows`); stop when |S| = budget. A rejected
    row's neighbour is the selected row of highest similarity (first selected on ties).

    Why the blocked version is identical: a block of rows is compared with all of
    S in one float32 matrix product. Rows above tau by more than the float32
    error bound are rejected, rows below by more than it survive, and the few in
    between (and near-tied maxima) are recomputed in float64. The survivors can
    only conflict with each other; walking them in order, a survivor is accepted
    iff no *accepted* earlier survivor of the block exceeds tau against it, which
    is exactly what the sequential loop would decide, because the earlier rows it
    would have added to S are precisely those accepted survivors. The budget cuts
    the block at its budget-th acceptance; everything after it is over budget.

    ``screen="bf16"`` does the big product against S in bfloat16 (torch) and
    recomputes in float32 every pair within BF16_MARGIN of tau or of its row's
    maximum: pairs outside that band cannot change a decision or a neighbour, so
    the result is the same. It is opt-in: on the 2-core AVX-512-BF16 box it was
    measured no faster than float32 (the screening's extra passes eat the gain).
    """
    order = np.asarray(order, dtype=np.int64)
    n, dim = len(order), vectors.shape[1]
    code = np.full(n, CODE_OVER_BUDGET, dtype=np.int8)
    neighbour = np.full(n, -1, dtype=np.int64)
    budget = max(0, int(budget))
    cap = min(budget, n)
    S = np.empty((cap, dim), dtype=np.float32)
    S64 = np.empty((cap, dim), dtype=np.float64)
    S_rows = np.empty(cap, dtype=np.int64)
    if screen not in ("f32", "bf16"):
        raise ValueError(f"screen must be 'f32' or 'bf16', not {screen!r}")
    if screen == "bf16":
        import torch

        S_bf16 = torch.empty((cap, dim), dtype=torch.bfloat16)
    k = 0
    pos = 0
    eps = FLOAT32_MARGIN
    seen = accepted_total = 0
    while pos < n and k < cap:
        # Size the block to what is likely needed to fill the budget, so the
        # last block does not compute far past the budget.
        rate = (accepted_total + 1) / (seen + 1)
        want = math.ceil((cap - k) / max(rate, 1e-3) * 1.2) + 8
        size = int(min(block_size, max(min_block, want), n - pos))
        # Only the rows the walk reaches are normalised (unit_rows: the definition's vectors).
        X, usable = unit_rows(vectors[order[pos : pos + size]])
        if not usable.all():
            raise ValueError("deita_walk needs rows with a direction; filter with usable_rows()")
        rejected = np.zeros(size, dtype=bool)
        best_val = np.full(size, -np.inf)  # similarity to the current neighbour of rejected rows
        if k:
            if screen == "bf16":
                rejected, cols, best_val = _against_selected_bf16(
                    X, S_bf16[:k], S[:k], S64[:k], tau, eps)
            else:
                rejected, cols, best_val = _against_selected_f32(X, S[:k], S64[:k], tau, eps)
            hit = np.flatnonzero(rejected)
            neighbour[pos + hit] = S_rows[cols[hit]]
        surv = np.flatnonzero(~rejected)
        accepted = np.zeros(size, dtype=bool)
        if surv.size:
            Xs = X[surv]
            W = _lower_gram(Xs)
            # float32 thresholds, and the ambiguous band includes both of them: no gaps.
            hi, lo = np.float32(tau + eps), np.float32(tau - eps)
            conflict = np.greater(W, hi)
            amb_i, amb_j = np.nonzero(np.greater_equal(W, lo) & np.less_equal(W, hi))
            if amb_i.size:
                exact = np.einsum(
                    "ij,ij->i", Xs[amb_i].astype(np.float64), Xs[amb_j].astype(np.float64)
                )
                conflict[amb_i, amb_j] = exact > tau
            conflict = np.tril(conflict, -1)
            acc = np.ones(surv.size, dtype=bool)
            for j in np.flatnonzero(conflict.any(axis=1)):
                earlier = np.flatnonzero(conflict[j, :j] & acc[:j])
                if earlier.size:
                    acc[j] = False
                    sims = W[j, earlier]
                    near = earlier[sims >= sims.max() - 2 * eps]
                    if near.size > 1:
                        exact = Xs[near].astype(np.float64) @ Xs[j].astype(np.float64)
                        best = int(near[int(np.argmax(exact))])
                    else:
                        best = int(near[0])
                    neighbour[pos + surv[j]] = pos + surv[best]
            accepted[surv[acc]] = True
            _nearer_in_block(X, S64[:k], S_rows[:k], pos, rejected, accepted, best_val, neighbour,
                             eps)
        # Budget: keep acceptances up to the (cap-k)-th; cut the block after it.
        acc_rows = np.flatnonzero(accepted)
        room = cap - k
        cut = size
        if acc_rows.size >= room:
            acc_rows = acc_rows[:room]
            cut = int(acc_rows[-1]) + 1 if room else 0
        block_code = code[pos : pos + cut]
        block_code[:] = CODE_TOO_SIMILAR
        block_code[acc_rows] = CODE_KEPT
        neighbour[pos + cut : pos + size] = -1
        m = acc_rows.size
        S[k : k + m] = X[acc_rows]
        S64[k : k + m] = X[acc_rows].astype(np.float64)
        if screen == "bf16":
            S_bf16[k : k + m] = torch.from_numpy(X[acc_rows]).to(torch.bfloat16)
        S_rows[k : k + m] = pos + acc_rows
        k += m
        seen += cut
        accepted_total += m
        pos += cut
    return WalkResult(code=code, neighbour=neighbour, selected_order=S_rows[:k].copy())


# ---- selectors ----------------------------------------------------------------
def select_deita(
    ids: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    vectors: np.ndarray,
    budget: int = 6000,
    tau: float = 0.9,
    vector_ok: np.ndarray | None = None,
    block_size: int = 2048,
    screen: str = "f32",
) -> Manifest:
    """DEITA's score-first, diversity-aware selection (SPEC §2), exact.

    Rows without a finite score or a usable embedding are ``failed_upstream``.
    """
    ids = list(ids)
    values = _as_scores(scores)
    vectors = np.asarray(vectors)
    if len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} embeddings")
    ok = usable_rows(vectors)
    if vector_ok is not None:
        ok &= np.asarray(vector_ok, dtype=bool)
    eligible = np.flatnonzero(ok & np.isfinite(values))
    order = score_order(ids, values, eligible)
    walk = deita_walk(vectors, order, budget, tau, block_size=block_size, screen=screen)
    n = len(ids)
    selected = np.zeros(n, dtype=bool)
    selected[order[walk.code == CODE_KEPT]] = True
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    reason = np.full(n, FAILED_UPSTREAM, dtype=object)
    reason[order[walk.code == CODE_KEPT]] = KEPT
    reason[order[walk.code == CODE_OVER_BUDGET]] = OVER_BUDGET
    similar = np.flatnonzero(walk.code == CODE_TOO_SIMILAR)
    for pos in similar:
        reason[order[pos]] = f"{TOO_SIMILAR}:{ids[order[walk.neighbour[pos]]]}"
    return Manifest(ids, values, selected, reason.tolist(), rank, ["deita"] * n)


def select_threshold(
    ids: Sequence[str], scores: Sequence[float] | np.ndarray, threshold: float
) -> Manifest:
    """AlpaGasus: keep score >= threshold (4.5 in the paper)."""
    ids = list(ids)
    values = _as_scores(scores)
    finite = np.isfinite(values)
    selected = finite & (values >= threshold)
    reason = [
        KEPT if s else (BELOW_THRESHOLD if f else FAILED_UPSTREAM)
        for s, f in zip(selected, finite, strict=True)
    ]
    rank = np.full(len(ids), -1, dtype=np.int64)
    order = score_order(ids, values, np.flatnonzero(finite))
    rank[order] = np.arange(order.size)
    return Manifest(ids, values, selected, reason, rank, ["threshold"] * len(ids))


def select_topk(ids: Sequence[str], scores: Sequence[float] | np.ndarray, k: int) -> Manifest:
    """The k best by a score column (ties by id); the rest are over budget."""
    ids = list(ids)
    values = _as_scores(scores)
    order = score_order(ids, values, np.flatnonzero(np.isfinite(values)))
    selected = np.zeros(len(ids), dtype=bool)
    selected[order[: max(0, int(k))]] = True
    rank = np.full(len(ids), -1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    reason = [
        KEPT if s else (OVER_BUDGET if r >= 0 else FAILED_UPSTREAM)
        for s, r in zip(selected, rank, strict=True)
    ]
    return Manifest(ids, values, selected, reason, rank, ["topk"] * len(ids))


def select_random(
    ids: Sequence[str],
    size: int,
    seed: int = 0,
    eligible: np.ndarray | None = None,
    scores: Sequence[float] | np.ndarray | None = None,
) -> Manifest:
    """A seeded random subset of the eligible rows (AlpaGasus' same-size baseline).

    The draw is over ids in sorted order, so it does not depend on input order.
    """
    ids = list(ids)
    n = len(ids)
    ok = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    pool = np.flatnonzero(ok)
    pool = pool[np.argsort(np.array([ids[i] for i in pool], dtype=object), kind="stable")]
    rng = np.random.default_rng(seed)
    take = min(max(0, int(size)), pool.size)
    drawn = pool[rng.permutation(pool.size)]
    selected = np.zeros(n, dtype=bool)
    selected[drawn[:take]] = True
    rank = np.full(n, -1, dtype=np.int64)
    rank[drawn] = np.arange(drawn.size)
    reason = [
        KEPT if s else (OVER_BUDGET if o else FAILED_UPSTREAM)
        for s, o in zip(selected, ok, strict=True)
    ]
    values = np.full(n, np.nan) if scores is None else _as_scores(scores)
    return Manifest(ids, values, selected, reason, rank, ["random"] * n)


def chain(first: Manifest, second: Manifest) -> Manifest:
    """Compose: ``second`` ran on the rows ``first`` kept; others keep ``first``'s verdict.

    ``second`` must cover exactly the ids ``first`` selected (in any order).
    """
    kept = {i for i, s in zip(first.ids, first.selected, strict=True) if s}
    if set(second.ids) != kept or len(second.ids) != len(kept):
        raise ValueError("the second selector must run on exactly the rows the first one kept")
    where = {i: j for j, i in enumerate(second.ids)}
    score = first.score.copy()
    selected = first.selected.copy()
    reason = list(first.reason)
    rank = first.rank.copy()
    selector = list(first.selector)
    for row, example_id in enumerate(first.ids):
        j = where.get(example_id)
        if j is None:
            continue
        score[row] = second.score[j]
        selected[row] = second.selected[j]
        reason[row] = second.reason[j]
        rank[row] = second.rank[j]
        selector[row] = f"{first.selector[row]}+{second.selector[j]}"
    return Manifest(list(first.ids), score, selected, reason, rank, selector)

