"""A witness index over the rows DEITA's walk has selected: it saves work, never changes a result.

Why: in a duplicate-heavy pool most rows the walk reaches are rejected, and a
rejection needs only one selected row above tau (a *witness*), not a product
with the whole selected set S. An inverted file finds witnesses cheaply:
spherical k-means cells, each selected row filed under its nearest centroid; a
row looks only at the selected rows of its ``probes`` nearest cells. Rows for
which no witness turns up are compared with all of S as before, so a poor
index only costs time.

A rejected row must still name its *most similar* selected row, which a witness
alone does not give. The near graph does. If ``x·w = v > tau`` and ``s*`` is
the nearest selected row (``x·s* >= v``), the triangle inequality on angles
gives ``angle(w, s*) <= angle(w, x) + angle(x, s*) <= 2·angle(x, w) <
2·arccos(tau)``, so ``cos(w, s*) > 2·tau² - 1``. Every selected row keeps the
selected rows within that bound (itself included), and the nearest neighbour is
among them: a handful of dot products instead of |S|.

All rows here are float32 unit vectors; float32 products are within 1e-4 of
the exact ones (see deita_walk.FLOAT32_MARGIN), and every threshold below is
widened by more than that.
"""

from __future__ import annotations

import numpy as np

from gleaner.tasks.select.similarity import best_per_group, exact_similarities

# Slack on the near-graph bound: far wider than the float32 error of a product.
NEAR_SLACK = 1e-3
# The bound 2·tau² - 1 only prunes when it is well above -1: below this tau the
# near graph would hold nearly every pair, and the index is not worth building.
MIN_TAU = 0.5


def spherical_kmeans(
    sample: np.ndarray, cells: int, iterations: int = 6, seed: int = 0
) -> np.ndarray:
    """Unit centroids of ``cells`` cosine clusters of ``sample`` (float32 unit rows).

    Lloyd's iterations with the assignment by largest dot product and the mean
    re-normalised; an emptied cell keeps its centroid. Only speed depends on them.
    """
    n = len(sample)
    cells = max(1, min(cells, n))
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(n, cells, replace=False)].copy()
    onehot = np.zeros((cells, n), dtype=np.float32)
    columns = np.arange(n)
    for _ in range(iterations):
        assign = (sample @ centroids.T).argmax(axis=1)
        onehot[:] = 0
        onehot[assign, columns] = 1
        sums = onehot @ sample
        norms = np.linalg.norm(sums, axis=1)
        filled = norms > 0
        centroids[filled] = sums[filled] / norms[filled, None]
    return np.ascontiguousarray(centroids, dtype=np.float32)


class WitnessIndex:
    """Cells and near graph over the first ``size`` rows of the walk's selected matrix S."""

    def __init__(self, centroids: np.ndarray, tau: float, probes: int = 1):
        if tau < MIN_TAU:
            raise ValueError(f"the witness index needs tau >= {MIN_TAU}, not {tau}")
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        cells, dim = self.centroids.shape
        self.probes = max(1, min(int(probes), cells))
        self.near_floor = np.float32(2.0 * tau * tau - 1.0 - NEAR_SLACK)
        self.size = 0
        self.cell_of = np.empty(0, dtype=np.int64)
        # Per cell: its selected rows' vectors and row numbers (ascending), in growing buffers.
        self.cell_vectors = [np.empty((0, dim), dtype=np.float32) for _ in range(cells)]
        self.cell_members = [np.empty(0, dtype=np.int64) for _ in range(cells)]
        self.cell_count = np.zeros(cells, dtype=np.int64)
        # A row is *contained* when its whole near list lies in its own cell: then the
        # most similar row of that cell is the nearest selected row (see witnesses()).
        self.contained = np.empty(0, dtype=bool)
        self.near_src = np.empty(0, dtype=np.int64)
        self.near_dst = np.empty(0, dtype=np.int64)
        self.near_indptr = np.zeros(1, dtype=np.int64)
        self.near_indices = np.empty(0, dtype=np.int64)

    @classmethod
    def build(cls, S: np.ndarray, sample: np.ndarray, tau: float, cells: int = 128,
              probes: int = 1, seed: int = 0) -> WitnessIndex:
        """Centroids from ``sample`` (rows like those to come), then index all of ``S``."""
        index = cls(spherical_kmeans(sample, cells, seed=seed), tau, probes)
        index.add(S, len(S))
        return index

    # ---- maintenance -----------------------------------------------------------------
    def add(self, S: np.ndarray, stop: int, older_sims: np.ndarray | None = None) -> None:
        """Index the selected rows ``size..stop-1`` of S (earlier rows are indexed already).

        ``older_sims``: those rows' float32 similarities with S[:size], when the caller
        has them already (the walk does), so they are not computed twice.
        """
        start = self.size
        if stop <= start:
            return
        new = S[start:stop]
        new_cells = (new @ self.centroids.T).argmax(axis=1)
        self.cell_of = np.concatenate([self.cell_of, new_cells])
        self._file(new, np.arange(start, stop), new_cells)
        if older_sims is None:
            older_sims = new @ S[:start].T
        # Near pairs of each new row with every older row, and with the new rows up to it
        # (itself included); a pair with an older row is stored both ways, (row, row) once.
        r_old, c_old = np.nonzero(older_sims >= self.near_floor)
        r_new, c_new = np.nonzero((new @ new.T >= self.near_floor)
                                  & np.tri(len(new), dtype=bool))
        r = np.concatenate([r_old, r_new]) + start
        c = np.concatenate([c_old, c_new + start])
        older = c < r
        self.near_src = np.concatenate([self.near_src, r, c[older]])
        self.near_dst = np.concatenate([self.near_dst, c, r[older]])
        self.contained = np.concatenate([self.contained, np.ones(stop - start, dtype=bool)])
        split = self.cell_of[r] != self.cell_of[c]
        self.contained[r[split]] = False
        self.contained[c[split]] = False
        self.size = stop
        order = np.lexsort((self.near_dst, self.near_src))
        self.near_indices = self.near_dst[order]
        self.near_indptr = np.searchsorted(self.near_src[order], np.arange(stop + 1))

    def _file(self, vectors: np.ndarray, rows: np.ndarray, cells: np.ndarray) -> None:
        """Append rows to their cells' buffers (doubling a buffer when it is full)."""
        by_cell = np.argsort(cells, kind="stable")
        cells, vectors, rows = cells[by_cell], vectors[by_cell], rows[by_cell]
        bounds = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            cell = int(cells[a])
            have, more = int(self.cell_count[cell]), b - a
            if have + more > len(self.cell_members[cell]):
                room = max(16, 2 * (have + more))
                grown = np.empty((room, vectors.shape[1]), dtype=np.float32)
                grown[:have] = self.cell_vectors[cell][:have]
                self.cell_vectors[cell] = grown
                ids = np.empty(room, dtype=np.int64)
                ids[:have] = self.cell_members[cell][:have]
                self.cell_members[cell] = ids
            self.cell_vectors[cell][have:have + more] = vectors[a:b]
            self.cell_members[cell][have:have + more] = rows[a:b]
            self.cell_count[cell] = have + more

    # ---- queries -----------------------------------------------------------------------
    def witnesses(self, X: np.ndarray, eps: float, probes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of X: the most similar selected row in its ``probes`` nearest cells, its
        float32 similarity (-1 and -inf where those cells hold no selected row), and whether
        another row of that cell came within 2·eps of it (a near tie)."""
        size = len(X)
        probes = max(1, min(int(probes or self.probes), len(self.centroids)))
        best = np.full(size, -np.inf, dtype=np.float32)
        witness = np.full(size, -1, dtype=np.int64)
        tied = np.zeros(size, dtype=bool)
        if not size or not self.size:
            return witness, best, tied
        P = X @ self.centroids.T
        top = np.empty((size, probes), dtype=np.int64)
        rows = np.arange(size)
        for probe in range(probes):  # a few argmax passes beat argpartition by far
            top[:, probe] = P.argmax(axis=1)
            P[rows, top[:, probe]] = -np.inf
        pair_cell = top.ravel()
        pair_row = np.repeat(rows, probes)
        order = np.argsort(pair_cell, kind="stable")
        pair_cell, pair_row = pair_cell[order], pair_row[order]
        bounds = np.flatnonzero(np.r_[True, pair_cell[1:] != pair_cell[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            cell = int(pair_cell[a])
            count = int(self.cell_count[cell])
            if not count:
                continue
            rows = pair_row[a:b]
            sims = X[rows] @ self.cell_vectors[cell][:count].T
            j = sims.argmax(axis=1)
            value = sims[np.arange(rows.size), j]
            better = value > best[rows]
            won = rows[better]
            best[won] = value[better]
            witness[won] = self.cell_members[cell][j[better]]
            close = (sims[better] >= value[better, None] - np.float32(2 * eps)).sum(axis=1)
            tied[won] = close > 1
        return witness, best, tied

    def nearest(
        self, X: np.ndarray, rows: np.ndarray, witness: np.ndarray, S: np.ndarray, eps: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For rows of X whose witness is surely above tau: the most similar selected row
        (first selected on exact ties) and its similarity, from the witness's near list."""
        starts = self.near_indptr[witness]
        counts = self.near_indptr[witness + 1] - starts
        seg = np.cumsum(counts) - counts
        flat = np.repeat(starts - seg, counts) + np.arange(int(counts.sum()))
        cols = self.near_indices[flat]
        pair_rows = np.repeat(rows, counts)
        vals = np.einsum("ij,ij->i", X[pair_rows], S[cols])
        top, best_col, close = best_per_group(vals, cols, seg, counts, eps)
        for g in np.flatnonzero(close > 1):  # near-tied in float32: decide in float64
            lo = seg[g]
            cand = cols[lo:lo + counts[g]]
            cand = cand[vals[lo:lo + counts[g]] >= top[g] - 2 * eps]
            best_col[g] = cand[int(np.argmax(exact_similarities(S, cand, X[rows[g]])))]
        return best_col, top.astype(np.float64)
