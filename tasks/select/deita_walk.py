"""DEITA's score-first, diversity-aware walk (SPEC §2), computed blockwise and exactly.

The definition: walk the rows in score order; a row joins the selected set S
iff its cosine similarity to every member of S is <= tau; stop when |S| reaches
the budget. :func:`deita_walk` computes exactly that with matrix products
instead of one row at a time, and, when most rows are being rejected, with a
witness index (tasks/walk_index.py) that avoids most of those products.

No Prefect, no Ray, no paths: plain numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from gleaner.tasks.select.similarity import exact_similarities
from gleaner.tasks.select.walk_index import MIN_TAU, WitnessIndex

# Walk outcome codes (input order), used by deita_walk.
CODE_KEPT, CODE_TOO_SIMILAR, CODE_OVER_BUDGET, CODE_FAILED = 0, 1, 2, 3

# A float32 dot product of two float32 unit vectors of dimension d is within
# gamma_d = d*u/(1-d*u) (u = 2**-24) of the exact value; 1e-4 bounds that for
# d <= ~1600 with room to spare. Anything closer than this to tau (or to a row's
# maximum) is decided in float64 instead.
FLOAT32_MARGIN = 1e-4

# When the witness index (tasks/walk_index.py) is built; it never changes the result.
INDEX_MODES = ("auto", "off", "always")
INDEX_MIN_SELECTED = 256  # auto: below this, a product with S is cheap anyway
INDEX_MIN_REJECTED = 0.5  # auto: build once a block rejects at least this share of its rows
INDEX_SAMPLE_ROWS = 4096  # upcoming rows the centroids are fitted on (with S)
INDEXED_BLOCK = 8192  # rows per block once indexed: the per-cell work is per block
SECOND_PROBES = 8  # cells a row with no witness in its first cells looks at before all of S


def unit_rows(vectors: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows, and a mask of rows that could be normalised.

    Normalisation happens in float64 and is rounded once to float32: these
    float32 unit vectors *are* the vectors the selection is defined on, so the
    reference loop and the blocked walk see identical inputs. Zero or non-finite
    rows have no direction (no cosine): they are reported, not guessed. Chunks
    are small so that the float64 copy stays in cache.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {vectors.shape}")
    out = np.empty(vectors.shape, dtype=np.float32)
    ok = np.empty(len(vectors), dtype=bool)
    for start in range(0, len(vectors), chunk):
        block = vectors[start : start + chunk].astype(np.float64)
        norms = np.einsum("ij,ij->i", block, block)  # inf/nan for a non-finite row
        good = np.isfinite(norms) & (norms > 0)
        np.sqrt(norms, out=norms)
        with np.errstate(invalid="ignore", divide="ignore"):
            block /= norms[:, None]
        part = out[start : start + chunk]
        part[...] = block
        if not good.all():
            part[~good] = 0.0
        ok[start : start + chunk] = good
    return out, ok


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


@dataclass
class WalkResult:
    """Outcome of :func:`deita_walk` for the rows it was given, in that order."""

    code: np.ndarray  # CODE_* per row
    neighbour: np.ndarray  # row index of the selected neighbour (too_similar), else -1
    selected_order: np.ndarray  # row indices in selection order
    # How the rows were decided: "walked", "witnessed" (rejected through the index),
    # "full_checked" (compared with all of S), "index_built_at" (|S| then, -1: never).
    stats: dict[str, int] = field(default_factory=dict)


class Scratch:
    """One reusable float32 buffer for a block's big temporaries.

    A product of a block with S is tens of MB; allocated afresh per block it is
    new zero pages every time (glibc maps such sizes directly), and on the
    2-core VM page faults cost about as much as the product itself.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.float32)

    def matrix(self, rows: int, cols: int) -> np.ndarray:
        need = rows * cols
        if need > self._buffer.size:
            self._buffer = np.empty(max(need, self._buffer.size * 3 // 2), dtype=np.float32)
        return self._buffer[:need].reshape(rows, cols)


# ---- exact decisions against the selected set -------------------------------------
def _refined_argmax(x: np.ndarray, cand: np.ndarray, S: np.ndarray) -> int:
    """Exact (float64) argmax among near-tied candidate columns; first in selection order wins."""
    if cand.size == 1:
        return int(cand[0])
    return int(cand[int(np.argmax(exact_similarities(S, cand, x)))])


def _against_selected_f32(
    X: np.ndarray, S: np.ndarray, tau: float, eps: float, scratch: Scratch | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of X rejected against S, their most similar column, and that similarity.

    Only columns whose float32 similarity is within the margin of what matters
    are recomputed exactly: any other column is surely on the same side of it.
    """
    size = len(X)
    cols = np.full(size, -1, dtype=np.int64)
    best_val = np.full(size, -np.inf)
    G = X @ S.T if scratch is None else np.matmul(X, S.T, out=scratch.matrix(len(X), len(S)))
    rows = np.arange(size)
    best = G.argmax(axis=1)
    rowmax32 = G[rows, best]
    rowmax = rowmax32.astype(np.float64)  # compare in float64: no gaps between the cases
    rejected = rowmax > tau + eps
    for r in np.flatnonzero(~rejected & (rowmax >= tau - eps)):  # borderline rows, exactly
        cand = np.flatnonzero(G[r] >= np.float32(tau - eps))
        sims = exact_similarities(S, cand, X[r])
        if sims.max() > tau:
            rejected[r] = True
            cols[r] = int(cand[int(np.argmax(sims))])
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
            cols[r] = _refined_argmax(X[r], cand, S)
    return rejected, cols, best_val


def _against_selected_indexed(
    X: np.ndarray, index: WitnessIndex, S: np.ndarray, tau: float, eps: float,
    full_check: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """As _against_selected_f32: rows with a witness surely above tau are rejected with the
    nearest neighbour from the near graph; every other row gets the full check against S.
    The last value is how many rows the index decided."""
    size = len(X)
    rejected = np.zeros(size, dtype=bool)
    cols = np.full(size, -1, dtype=np.int64)
    best_val = np.full(size, -np.inf)
    witness, similarity, tied = index.witnesses(X, eps)
    sure = similarity.astype(np.float64) > tau + eps
    second = np.flatnonzero(~sure)
    if second.size:  # a second chance in more cells is still far cheaper than all of S
        witness[second], similarity[second], tied[second] = index.witnesses(
            X[second], eps, SECOND_PROBES)
        sure[second] = similarity[second].astype(np.float64) > tau + eps
    # A contained witness with no near tie in its cell is the nearest selected row itself;
    # any other witness hands its near list to nearest().
    quick = sure & index.contained[np.maximum(witness, 0)] & ~tied
    rejected[quick] = True
    cols[quick] = witness[quick]
    best_val[quick] = similarity[quick]
    hit = np.flatnonzero(sure & ~quick)
    if hit.size:
        cols[hit], best_val[hit] = index.nearest(X, hit, witness[hit], S, eps)
        rejected[hit] = True
    rest = np.flatnonzero(~sure)
    if rest.size:
        rejected[rest], cols[rest], best_val[rest] = full_check(X[rest])
    return rejected, cols, best_val, int(sure.sum())


# ---- conflicts inside a block --------------------------------------------------------
_TILE = 256
_UPPER = np.triu(np.ones((_TILE, _TILE), dtype=bool))


def _lower_gram(Xs: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """Xs @ Xs.T strictly below the diagonal, -inf on and above it: half the flops, and a
    row's maximum says at once whether it can conflict with an earlier row."""
    m = len(Xs)
    W = np.empty((m, m), dtype=np.float32) if scratch is None else scratch.matrix(m, m)
    for i0 in range(0, m, _TILE):
        i1 = min(m, i0 + _TILE)
        W[i0:i1, :i1] = Xs[i0:i1] @ Xs[:i1].T
        W[i0:i1, i1:] = -np.inf
        W[i0:i1, i0:i1][_UPPER[: i1 - i0, : i1 - i0]] = -np.inf
    return W


def _resolve_block(Xs: np.ndarray, tau: float, eps: float, scratch: Scratch | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The sequential walk over rows that no selected row rejects: which are accepted, and
    for the others the (local) accepted row they are most similar to."""
    m = len(Xs)
    acc = np.ones(m, dtype=bool)
    nearest = np.full(m, -1, dtype=np.int64)
    W = _lower_gram(Xs, scratch)
    hi, lo = np.float32(tau + eps), np.float32(tau - eps)
    rows = np.flatnonzero(W.max(axis=1, initial=-np.inf) >= lo)  # rows with a possible conflict
    if not rows.size:
        return acc, nearest
    Wr = W[rows]
    conflict = Wr > hi
    # float32 thresholds, and the ambiguous band includes both of them: no gaps.
    amb_r, amb_j = np.nonzero((Wr >= lo) & (Wr <= hi))
    if amb_r.size:
        exact = np.einsum("ij,ij->i", Xs[rows[amb_r]].astype(np.float64),
                          Xs[amb_j].astype(np.float64))
        conflict[amb_r, amb_j] = exact > tau
    for t, j in enumerate(rows):
        earlier = np.flatnonzero(conflict[t, :j] & acc[:j])
        if not earlier.size:
            continue
        acc[j] = False
        sims = Wr[t, earlier]
        near = earlier[sims >= sims.max() - 2 * eps]
        nearest[j] = _refined_argmax(Xs[j], near, Xs) if near.size > 1 else int(near[0])
    return acc, nearest


def _nearer_in_block(
    X: np.ndarray,
    S: np.ndarray,
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
        # Too close to call in float32: decide over S and the earlier acceptances exactly,
        # among those within the float32 margin of the best (no other can be the best).
        earlier = acc[acc < r]
        g = S @ X[r]
        floor = max(float(g.max(initial=-np.inf)), float(top[j])) - 2 * eps
        from_s = np.flatnonzero(g >= floor)
        from_block = earlier[H[j, : earlier.size] >= floor]
        sims = np.concatenate([exact_similarities(S, from_s, X[r]),
                               exact_similarities(X, from_block, X[r])])
        best = int(np.argmax(sims))
        neighbour[pos + r] = S_rows[from_s[best]] if best < from_s.size else pos + int(
            from_block[best - from_s.size])
        best_val[r] = sims[best]


# ---- the walk -------------------------------------------------------------------------
def index_cells(budget: int) -> int:
    """Cells of the witness index: about the square root of what S will hold, times two."""
    return int(min(256, max(8, round(2 * math.sqrt(max(1, budget))))))


def deita_walk(
    vectors: np.ndarray,
    order: np.ndarray,
    budget: int,
    tau: float,
    block_size: int = 2048,
    min_block: int = 64,
    index: str = "auto",
    cells: int | None = None,
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

    ``index``: with ``"auto"`` (the default), once blocks reject most of their
    rows, a witness index over S (tasks/walk_index.py) replaces the product with
    all of S for the rows it finds a selected row surely above tau for; the others
    are checked in full as before, so the result is the same. ``"off"`` never
    builds it, ``"always"`` builds it as soon as S is not empty (for tests);
    ``cells`` overrides its number of cells. It needs tau >= 0.5.
    """
    order = np.asarray(order, dtype=np.int64)
    n, dim = len(order), vectors.shape[1]
    code = np.full(n, CODE_OVER_BUDGET, dtype=np.int8)
    neighbour = np.full(n, -1, dtype=np.int64)
    budget = max(0, int(budget))
    cap = min(budget, n)
    S = np.empty((cap, dim), dtype=np.float32)
    S_rows = np.empty(cap, dtype=np.int64)
    if index not in INDEX_MODES:
        raise ValueError(f"index must be one of {', '.join(INDEX_MODES)}, not {index!r}")
    k = 0
    pos = 0
    eps = FLOAT32_MARGIN
    witness_index: WitnessIndex | None = None
    against, gram = Scratch(), Scratch()  # reused across blocks: fresh pages cost page faults
    stats = {"walked": 0, "witnessed": 0, "full_checked": 0, "index_built_at": -1}
    while pos < n and k < cap:
        # Size the block to what is likely needed to fill the budget, so the
        # last block does not compute far past the budget.
        rate = (k + 1) / (pos + 1)  # acceptances so far per row walked
        want = math.ceil((cap - k) / max(rate, 1e-3) * 1.2) + 8
        limit = block_size if witness_index is None else max(block_size, INDEXED_BLOCK)
        size = int(min(limit, max(min_block, want), n - pos))
        # Only the rows the walk reaches are normalised (unit_rows: the definition's vectors).
        X, usable = unit_rows(vectors[order[pos : pos + size]])
        if not usable.all():
            raise ValueError("deita_walk needs rows with a direction; filter with usable_rows()")
        rejected = np.zeros(size, dtype=bool)
        cols = np.full(size, -1, dtype=np.int64)  # nearest selected row of rejected rows
        best_val = np.full(size, -np.inf)  # similarity to the current neighbour of rejected rows
        if k:
            full_check = partial(_against_selected_f32, S=S[:k], tau=tau, eps=eps,
                                 scratch=against)
            if witness_index is not None:
                rejected, cols, best_val, witnessed = _against_selected_indexed(
                    X, witness_index, S[:k], tau, eps, full_check)
            else:
                (rejected, cols, best_val), witnessed = full_check(X), 0
            stats["witnessed"] += witnessed
            stats["full_checked"] += size - witnessed
            hit = np.flatnonzero(rejected)
            neighbour[pos + hit] = S_rows[cols[hit]]
        surv = np.flatnonzero(~rejected)
        accepted = np.zeros(size, dtype=bool)
        older_sims = None  # the block's acceptances against S, once the index needs them
        if surv.size:
            kept, nearest = _resolve_block(X[surv], tau, eps, gram)
            accepted[surv[kept]] = True
            lost = np.flatnonzero(nearest >= 0)
            neighbour[pos + surv[lost]] = pos + surv[nearest[lost]]
            check = rejected
            if witness_index is not None:
                # A rejected row can only be nearer to an acceptance that is near its
                # selected neighbour (the near-graph bound): check just those rows.
                older_sims = X[accepted] @ S[:k].T
                near_cols = np.unique(np.nonzero(older_sims >= witness_index.near_floor)[1])
                check = rejected & np.isin(cols, near_cols)
            _nearer_in_block(X, S[:k], S_rows[:k], pos, check, accepted, best_val, neighbour,
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
        S_rows[k : k + m] = pos + acc_rows
        k += m
        pos += cut
        if witness_index is not None:
            witness_index.add(S, k, None if older_sims is None else older_sims[:m])
        elif _index_pays(index, tau, k, cap, cut, m, n - pos, block_size):
            upcoming, _ = unit_rows(vectors[order[pos : pos + INDEX_SAMPLE_ROWS]])
            witness_index = WitnessIndex.build(
                S[:k], np.concatenate([S[:k], upcoming]), tau, cells=cells or index_cells(cap))
            stats["index_built_at"] = k
    stats["walked"] = pos
    return WalkResult(code=code, neighbour=neighbour, selected_order=S_rows[:k].copy(),
                      stats=stats)


def _index_pays(mode: str, tau: float, k: int, cap: int, walked: int, accepted: int,
                left: int, block_size: int) -> bool:
    """Whether to build the witness index after this block (it never changes the result)."""
    if mode == "off" or tau < MIN_TAU or not k or k >= cap or not left:
        return False
    if mode == "always":
        return True
    rejected_share = (walked - accepted) / max(1, walked)
    return (k >= INDEX_MIN_SELECTED and rejected_share >= INDEX_MIN_REJECTED
            and left >= 2 * block_size)
