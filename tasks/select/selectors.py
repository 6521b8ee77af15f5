"""Selectors: which examples make the curated set, and why every other one does not.

Every selector returns a :class:`Manifest` with one row per candidate example:
``selected`` and a ``reason`` drawn from a closed vocabulary (``kept``,
``below_threshold``, ``above_threshold``, ``too_similar:<id of the selected
neighbour>``, ``over_budget``, ``failed_upstream``, and the reasons of the pool stages
that mark examples to leave out: ``contaminated:<test set>``, ``near_duplicate:<id of the
kept example>``), so the counts always add up to the pool.

The ``deita`` selector implements DEITA's score-first, diversity-aware walk
(SPEC §2) exactly: sort by score descending (ties by id), add an example only
if its cosine similarity to every already-selected example is <= tau, stop at
the budget. It computes that walk with blocked matrix products instead of one
row at a time (tasks/deita_walk.py says why the result is identical).

No Prefect, no Ray, no paths: plain numpy and pyarrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from gleaner.registry import register, registry
from gleaner.tasks.select.deita_walk import (
    CODE_FAILED,
    CODE_KEPT,
    CODE_OVER_BUDGET,
    CODE_TOO_SIMILAR,
    deita_walk,
    usable_rows,
)

KEPT = "kept"
BELOW_THRESHOLD = "below_threshold"
ABOVE_THRESHOLD = "above_threshold"  # over a ceiling (IFD > 1: the question does not help)
TOO_SIMILAR = "too_similar"
OVER_BUDGET = "over_budget"
FAILED_UPSTREAM = "failed_upstream"
# marked by a pool stage before any selector runs (gleaner.engine.catalog.Drop)
CONTAMINATED = "contaminated"  # shares an n-gram with (or equals) a test prompt
NEAR_DUPLICATE = "near_duplicate"  # in a MinHash cluster whose longest response is kept
REASONS = (KEPT, BELOW_THRESHOLD, ABOVE_THRESHOLD, TOO_SIMILAR, OVER_BUDGET, FAILED_UPSTREAM,
           CONTAMINATED, NEAR_DUPLICATE)
_WALK_LABELS = np.empty(4, dtype=object)  # indexed by the walk's CODE_* values
_WALK_LABELS[[CODE_KEPT, CODE_TOO_SIMILAR, CODE_OVER_BUDGET, CODE_FAILED]] = [
    KEPT, TOO_SIMILAR, OVER_BUDGET, FAILED_UPSTREAM]

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
            family = reason.split(":", 1)[0]
            counts[family] = counts.get(family, 0) + 1  # a plugin stage's own drop reason
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

    Only tied runs are sorted by id (comparing Python strings is the slow part),
    so the first sort need not be stable; within a run, equal ids keep input order.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        return candidates
    keys = -scores[candidates]
    order = candidates[np.argsort(keys)]
    sorted_keys = -scores[order]
    starts = np.flatnonzero(np.diff(sorted_keys) == 0)
    if starts.size == 0:
        return order
    # Runs of equal scores: [a, b) where b is the first index with another score.
    boundaries = np.flatnonzero(np.diff(sorted_keys) != 0) + 1
    edges = np.concatenate([[0], boundaries, [order.size]])
    lengths = np.diff(edges)
    for a, b in zip(edges[:-1][lengths > 1], edges[1:][lengths > 1], strict=True):
        run = np.sort(order[a:b])
        run_ids = np.array([ids[i] for i in run], dtype=object)
        order[a:b] = run[np.argsort(run_ids, kind="stable")]
    return order


# ---- selectors ----------------------------------------------------------------
def select_deita(
    ids: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    vectors: np.ndarray,
    budget: int = 6000,
    tau: float = 0.9,
    vector_ok: np.ndarray | None = None,
    block_size: int = 2048,
    index: str = "auto",
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
    walk = deita_walk(vectors, order, budget, tau, block_size=block_size, index=index)
    n = len(ids)
    selected = np.zeros(n, dtype=bool)
    selected[order[walk.code == CODE_KEPT]] = True
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    # One code per row, then one take of the labels (object-array fills are slow per row).
    codes = np.full(n, CODE_FAILED, dtype=np.int8)
    codes[order] = walk.code
    reason = _WALK_LABELS[codes]
    similar = np.flatnonzero(walk.code == CODE_TOO_SIMILAR)
    if similar.size:
        neighbours = np.array(ids, dtype=object)[order[walk.neighbour[similar]]]
        reason[order[similar]] = np.add(f"{TOO_SIMILAR}:", neighbours)
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


def select_ifd(ids: Sequence[str], ifd: Sequence[float] | np.ndarray, budget: int,
               ceiling: float = 1.0) -> Manifest:
    """Cherry LLM (SPEC §9): drop IFD > ``ceiling`` (1: the question does not help), rank the
    rest by IFD descending (ties by id), keep the first ``budget``."""
    ids = list(ids)
    values = _as_scores(ifd)
    finite = np.isfinite(values)
    over = finite & (values > ceiling)
    order = score_order(ids, values, np.flatnonzero(finite & ~over))
    selected = np.zeros(len(ids), dtype=bool)
    selected[order[: max(0, int(budget))]] = True
    rank = np.full(len(ids), -1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    reason = [
        KEPT if s else ABOVE_THRESHOLD if o else OVER_BUDGET if r >= 0 else FAILED_UPSTREAM
        for s, o, r in zip(selected, over, rank, strict=True)
    ]
    return Manifest(ids, values, selected, reason, rank, ["ifd"] * len(ids))


def select_full(ids: Sequence[str]) -> Manifest:
    """Every example (AlpaGasus' "all 52k" arm); the rank is the pool's order."""
    ids = list(ids)
    n = len(ids)
    return Manifest(ids, np.full(n, np.nan), np.ones(n, dtype=bool), [KEPT] * n,
                    np.arange(n, dtype=np.int64), ["full"] * n)


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



# ---- the registry: config, CLI and curate choose by name -------------------------------------
@dataclass
class Candidates:
    """Every example's id with the signals upstream stages made for it (by id), and vectors."""

    ids: list[str]
    columns: dict[str, np.ndarray]
    vectors: np.ndarray | None = None
    vector_ok: np.ndarray | None = None
    # list-valued signals (InsTag's tags): one list per example, None where there is none
    labels: dict[str, list[list[str] | None]] = field(default_factory=dict)
    # the reason a pool stage marked an example to leave out (``contaminated:koala``), or None
    marks: list[str | None] | None = None

    def subset(self, rows: np.ndarray) -> Candidates:
        return Candidates(
            [self.ids[i] for i in rows], {k: v[rows] for k, v in self.columns.items()},
            None if self.vectors is None else self.vectors[rows],
            None if self.vector_ok is None else self.vector_ok[rows],
            {k: [v[i] for i in rows] for k, v in self.labels.items()},
            None if self.marks is None else [self.marks[i] for i in rows])

    def column(self, name: str) -> np.ndarray:
        if not self.ids:  # an empty pool has every column, empty
            return np.empty(0, dtype=np.float64)
        if name not in self.columns:
            known = ", ".join(sorted(self.columns)) or "none (run rate or score first)"
            raise ValueError(f"no score column {name!r} in run; available: {known}")
        return self.columns[name]


@dataclass
class SelectRequest:
    """What a selector is asked: the settings, resolved (sort column, threshold, size)."""

    sort_by: str | None
    budget: int
    tau: float
    threshold: float | None
    seed: int
    size: int | None = None  # random: as many as another selection kept
    fraction: float | None = None  # a share of the pool instead of the budget
    min_label_frequency: int = 1  # InsTag: labels rarer than this over the pool are dropped
    drop_marked: bool = True  # examples a pool stage marked get its reason, never selected


@dataclass(frozen=True)
class Selector:
    """A registered selector: how to run it, what it ranks by when not told."""

    run: Any  # (Candidates, SelectRequest) -> Manifest
    default_sort: str | None = None
    needs_vectors: bool = False
    own_threshold: bool = False  # --threshold is its own parameter, not a filter first
    budgeted: bool = True  # keeps a budget (or a fraction of the pool); False: a rule decides
    uses_tau: bool = False  # a diversity threshold is part of its settings (DEITA)
    uses_seed: bool = False  # its pick depends on a seed (random)
    sized_like_another: bool = False  # can keep as many as another arm did (size_of)
    keeps_everything: bool = False  # selects the whole pool


def _threshold(data: Candidates, r: SelectRequest) -> Manifest:
    return select_threshold(data.ids, data.column(r.sort_by or "rating"), r.threshold or 0.0)


def _topk(data: Candidates, r: SelectRequest) -> Manifest:
    return select_topk(data.ids, data.column(r.sort_by or "evol"), r.budget)


def _random(data: Candidates, r: SelectRequest) -> Manifest:
    scores = data.columns.get(r.sort_by or "")
    return select_random(data.ids, r.size if r.size is not None else r.budget, r.seed,
                         scores=scores)


def _deita(data: Candidates, r: SelectRequest) -> Manifest:
    if data.vectors is None:
        raise ValueError("the deita selector needs embeddings; run gleaner embed first")
    return select_deita(data.ids, data.column(r.sort_by or "evol"), data.vectors,
                        budget=r.budget, tau=r.tau, vector_ok=data.vector_ok)


def _ifd(data: Candidates, r: SelectRequest) -> Manifest:
    return select_ifd(data.ids, data.column(r.sort_by or "ifd"), r.budget)


def _longest(data: Candidates, r: SelectRequest) -> Manifest:
    """Long-is-more: the ``budget`` longest responses (tokens; ``response_chars`` for chars)."""
    manifest = select_topk(data.ids, data.column(r.sort_by or "response_tokens"), r.budget)
    manifest.selector = ["longest"] * len(manifest)
    return manifest


def _full(data: Candidates, r: SelectRequest) -> Manifest:
    return select_full(data.ids)


register("selector", "threshold")(Selector(_threshold, "rating", own_threshold=True,
                                           budgeted=False))
register("selector", "topk")(Selector(_topk, "evol"))
register("selector", "random")(Selector(_random, uses_seed=True, sized_like_another=True))
register("selector", "deita")(Selector(_deita, "evol", needs_vectors=True, uses_tau=True))
register("selector", "ifd")(Selector(_ifd, "ifd"))
register("selector", "longest")(Selector(_longest, "response_tokens"))
register("selector", "full")(Selector(_full, budgeted=False, keeps_everything=True))


def selector(name: str) -> Selector:
    return registry("selector").get(name)


def run_selector(data: Candidates, name: str, request: SelectRequest) -> Manifest:
    """The named selector on the candidates; after AlpaGasus' threshold when one is set."""
    if request.drop_marked and data.marks is not None and any(data.marks):
        return without_marked(data, name, request)
    chosen = selector(name)
    request.sort_by = request.sort_by or chosen.default_sort
    if request.fraction is not None:  # a share of the whole pool (IFD's "top 5 %")
        request.budget = int(round(request.fraction * len(data.ids)))
    if chosen.own_threshold or request.threshold is None:
        return chosen.run(data, request)
    if "rating" not in data.columns:
        raise ValueError("--threshold filters on the AlpaGasus rating; run gleaner rate first")
    first = select_threshold(data.ids, data.columns["rating"], request.threshold)
    second = chosen.run(data.subset(np.flatnonzero(first.selected)), request)
    return chain(first, second)


class NothingLeft(ValueError):
    """Every example of the pool is marked to be left out: there is nothing to select."""


def without_marked(data: Candidates, name: str, request: SelectRequest) -> Manifest:
    """The selector on the examples no pool stage marked (a fraction is of those); every
    marked example keeps its mark as its reason, unselected and unranked."""
    marks = data.marks or []
    clean = np.array([mark is None for mark in marks], dtype=bool)
    if not clean.any():
        families: dict[str, int] = {}
        for mark in marks:
            family = (mark or "").split(":", 1)[0]
            families[family] = families.get(family, 0) + 1
        said = ", ".join(f"{count:,} {family}" for family, count in families.items())
        raise NothingLeft(f"every one of the {len(marks):,} examples of the pool is marked to "
                          f"be left out ({said}): nothing to select (select.drop_marked: "
                          "false keeps them)")
    rows = np.flatnonzero(clean)
    inner = run_selector(data.subset(rows), name, replace(request, drop_marked=False))
    n = len(data.ids)
    score = np.full(n, np.nan)
    selected = np.zeros(n, dtype=bool)
    rank = np.full(n, -1, dtype=np.int64)
    reason = np.array([mark or "" for mark in marks], dtype=object)
    chosen = np.full(n, name, dtype=object)
    if len(inner) != rows.size:  # a selector answers for every candidate, in their order
        raise ValueError(f"selector {name!r} returned {len(inner)} rows for {rows.size}")
    score[rows], selected[rows], rank[rows] = inner.score, inner.selected, inner.rank
    reason[rows] = np.array(inner.reason, dtype=object)
    chosen[rows] = np.array(inner.selector, dtype=object)
    return Manifest(list(data.ids), score, selected, reason.tolist(), rank, chosen.tolist())
