"""The selectors, above all: the blocked DEITA walk equals the plain sequential definition."""

from __future__ import annotations

import numpy as np
import pytest

from gleaner.tasks.select.deita_walk import deita_walk, unit_rows
from gleaner.tasks.select.selectors import (
    FAILED_UPSTREAM,
    KEPT,
    OVER_BUDGET,
    Manifest,
    chain,
    select_deita,
    select_random,
    select_threshold,
    select_topk,
)


def reference_deita(ids, scores, vectors, budget, tau):
    """SPEC §2 read literally: one row at a time against the selected matrix.

    Similarities are float64 dot products of the float32 unit vectors (the
    definition the selector documents); the neighbour is the most similar
    selected example, the first selected one on exact ties.
    """
    unit, ok = unit_rows(vectors)
    scores = np.asarray(scores, dtype=np.float64)
    eligible = [i for i in range(len(ids)) if ok[i] and np.isfinite(scores[i])]
    order = sorted(eligible, key=lambda i: (-scores[i], ids[i]))
    reasons = {i: FAILED_UPSTREAM for i in range(len(ids))}
    chosen: list[int] = []
    chosen_vecs = np.empty((0, unit.shape[1]), dtype=np.float64)
    for i in order:
        if len(chosen) >= budget:
            reasons[i] = OVER_BUDGET
            continue
        x = unit[i].astype(np.float64)
        if chosen:
            sims = chosen_vecs @ x
            if sims.max() > tau:
                reasons[i] = f"too_similar:{ids[chosen[int(np.argmax(sims))]]}"
                continue
        chosen.append(i)
        chosen_vecs = np.vstack([chosen_vecs, x])
        reasons[i] = KEPT
    return [ids[i] for i in chosen], [reasons[i] for i in range(len(ids))]


def clustered(n, dim, centres, spread, seed, duplicates=0, tie_levels=None):
    """Points around random centres; some exact duplicates; optionally tied scores."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    assign = rng.integers(0, centres, n)
    x = c[assign] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x = x.astype(np.float32)
    if duplicates:
        src = rng.integers(0, n, duplicates)
        dst = rng.choice(n, duplicates, replace=False)
        x[dst] = x[src]
    scores = rng.random(n) * 36
    if tie_levels:
        scores = np.round(scores * tie_levels / 36) * 36 / tie_levels
    ids = [f"ex{rng.integers(0, 10**9):09d}-{i}" for i in range(n)]
    return ids, scores, x


CASES = [
    # (n, centres, spread, tau, budget, tie_levels, block)
    (3000, 300, 0.45, 0.9, 6000, None, 2048),
    (3000, 400, 0.35, 0.9, 700, 7, 256),
    (2500, 900, 0.4, 0.8, 600, 12, 128),
    (4000, 1500, 0.26, 0.95, 1500, 5, 512),
    (2000, 40, 0.5, 0.7, 100000, 3, 64),
]


@pytest.mark.parametrize("index", ["off", "always"])
@pytest.mark.parametrize(("n", "centres", "spread", "tau", "budget", "ties", "block"), CASES)
def test_deita_equals_sequential_definition(n, centres, spread, tau, budget, ties, block, index):
    ids, scores, x = clustered(n, 48, centres, spread, seed=n + centres, duplicates=n // 10,
                               tie_levels=ties)
    manifest = select_deita(ids, scores, x, budget=budget, tau=tau, block_size=block,
                            index=index)
    want_ids, want_reasons = reference_deita(ids, scores, x, budget, tau)
    assert manifest.selected_ids == want_ids
    assert manifest.reason == want_reasons
    counts = manifest.counts()
    assert sum(counts.values()) == n
    # The data must exercise every branch, or the equality above proves little.
    assert counts["too_similar"] > n // 20
    if budget < n:
        assert counts["over_budget"] > n // 20 and counts["kept"] == budget


def test_exact_duplicates_point_at_the_selected_copy():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((50, 16)).astype(np.float32)
    x = np.concatenate([base, base, base])  # each vector three times
    ids = [f"id{i:03d}" for i in range(150)]
    scores = np.full(150, 3.0)  # all tied: order is by id
    m = select_deita(ids, scores, x, budget=1000, tau=0.9)
    assert m.selected_ids == ids[:50]
    for i in range(50, 150):
        assert m.reason[i] == f"too_similar:id{i % 50:03d}"


def test_failed_upstream_rows_never_selected():
    ids = ["a", "b", "c", "d"]
    x = np.eye(4, dtype=np.float32)
    x[2] = 0  # no direction
    m = select_deita(ids, [1.0, None, 3.0, float("nan")], x, budget=10, tau=0.9)
    assert m.reason == [KEPT, FAILED_UPSTREAM, FAILED_UPSTREAM, FAILED_UPSTREAM]
    table = m.to_table()
    assert table.column("rank").to_pylist() == [0, None, None, None]
    assert Manifest.from_table(table).reason == m.reason


def test_threshold_topk_random_account_for_every_row():
    ids = [f"r{i}" for i in range(10)]
    scores = [5, 4.5, 4.4, None, 2, 5, 4.5, 1, 0, 3]
    t = select_threshold(ids, scores, 4.5)
    assert [i for i, s in zip(ids, t.selected, strict=True) if s] == ["r0", "r1", "r5", "r6"]
    assert t.counts() == {"kept": 4, "below_threshold": 5, "above_threshold": 0,
                          "too_similar": 0, "over_budget": 0, "failed_upstream": 1,
                          "contaminated": 0, "near_duplicate": 0}
    k = select_topk(ids, scores, 3)
    assert k.selected_ids == ["r0", "r5", "r1"]  # 5, 5 (by id), then 4.5 tie -> r1 before r6
    assert k.counts()["over_budget"] == 6 and k.counts()["failed_upstream"] == 1
    r1 = select_random(ids, 4, seed=7)
    r2 = select_random(list(reversed(ids)), 4, seed=7)
    assert sorted(r1.selected_ids) == sorted(r2.selected_ids)  # input order does not matter
    assert r1.counts()["kept"] == 4 and r1.counts()["over_budget"] == 6


def test_random_draws_differ_by_seed_and_respect_eligibility():
    ids = [f"r{i:03d}" for i in range(200)]
    eligible = np.arange(200) % 2 == 0
    a = select_random(ids, 30, seed=1, eligible=eligible)
    b = select_random(ids, 30, seed=2, eligible=eligible)
    assert set(a.selected_ids) != set(b.selected_ids)
    assert all(int(i[1:]) % 2 == 0 for i in a.selected_ids)
    assert a.counts()["failed_upstream"] == 100


def test_chain_threshold_then_deita():
    ids, scores, x = clustered(600, 32, 40, 0.4, seed=3)
    rating = np.random.default_rng(4).choice([3.0, 4.0, 4.5, 5.0], 600)
    first = select_threshold(ids, rating, 4.5)
    keep = np.flatnonzero(first.selected)
    second = select_deita([ids[i] for i in keep], scores[keep], x[keep], budget=50, tau=0.9)
    final = chain(first, second)
    assert sum(final.counts().values()) == 600
    assert final.counts()["below_threshold"] == first.counts()["below_threshold"]
    assert final.selected_ids == second.selected_ids
    assert all(rating[ids.index(i)] >= 4.5 for i in final.selected_ids)
    assert {s for s in final.selector} == {"threshold", "threshold+deita"}


@pytest.mark.parametrize("index", ["off", "always"])
@pytest.mark.parametrize("block", [1, 64])  # against S (separate blocks) and within a block
def test_similarity_on_the_float32_edge_of_the_margin(block, index):
    """Similarities one float32 ulp around tau +- margin must still be decided exactly."""
    tau = 0.9
    edges = [np.float32(tau + 1e-4), np.float32(tau - 1e-4), np.float32(tau),
             np.nextafter(np.float32(tau), np.float32(1))]
    for c in edges:
        s = np.zeros(8, dtype=np.float32)
        s[0] = 1.0
        x = np.zeros(8, dtype=np.float32)
        x[0], x[1] = c, np.float32(np.sqrt(1 - float(c) ** 2))
        unit, _ = unit_rows(np.stack([s, x]))
        exact = float(unit[0].astype(np.float64) @ unit[1].astype(np.float64))
        m = select_deita(["a", "b"], [2.0, 1.0], np.stack([s, x]), budget=5, tau=tau,
                         block_size=block, index=index)
        want = "too_similar:a" if exact > tau else "kept"
        assert m.reason[1] == want, (c, exact)


@pytest.mark.parametrize("cells", [1, 7, 64])
def test_witness_index_decides_most_rejections_without_changing_the_walk(cells):
    """Duplicate-heavy data: the index must do the work (most rows witnessed), and the walk
    must be the same row for row as the one that compares every row with all of S."""
    ids, scores, x = clustered(6000, 48, 150, 0.3, seed=11, duplicates=300, tie_levels=9)
    order = np.lexsort((np.array(ids), -scores))
    plain = deita_walk(x, order, 900, 0.9, block_size=256, index="off")
    indexed = deita_walk(x, order, 900, 0.9, block_size=256, index="always", cells=cells)
    assert np.array_equal(indexed.code, plain.code)
    assert np.array_equal(indexed.neighbour, plain.neighbour)
    assert np.array_equal(indexed.selected_order, plain.selected_order)
    assert plain.stats["witnessed"] == 0 and plain.stats["index_built_at"] == -1
    rejected = int((plain.code == 1).sum())
    assert rejected > 3000
    assert indexed.stats["index_built_at"] > 0
    assert indexed.stats["witnessed"] > rejected // 2
    assert indexed.stats["witnessed"] + indexed.stats["full_checked"] <= indexed.stats["walked"]


def test_auto_index_builds_only_when_most_rows_are_rejected():
    light_ids, light_scores, light = clustered(5000, 48, 5000, 0.6, seed=5)
    heavy_ids, heavy_scores, heavy = clustered(20000, 48, 60, 0.3, seed=6)
    light_walk = deita_walk(light, np.argsort(-light_scores), 3000, 0.9, block_size=512)
    heavy_walk = deita_walk(heavy, np.argsort(-heavy_scores), 2000, 0.9, block_size=512)
    assert light_walk.stats["index_built_at"] == -1
    assert heavy_walk.stats["index_built_at"] >= 256
    assert heavy_walk.stats["witnessed"] > 0


def test_index_never_changes_the_walk_on_random_inputs():
    """A sweep over shapes the named cases miss: tiny dimensions, one to a few cells,
    single-row blocks, tau from 0.5 to 0.97, duplicates and ties."""
    rng = np.random.default_rng(7)
    for case in range(30):
        n = int(rng.integers(50, 1500))
        dim = int(rng.choice([2, 4, 16, 48]))
        ids, scores, x = clustered(n, dim, int(rng.integers(1, 300)),
                                   float(rng.choice([0.1, 0.3, 0.5])), seed=1000 + case,
                                   duplicates=n // 6, tie_levels=[None, 3][case % 2])
        order = np.lexsort((np.array(ids), -scores))
        tau = float(rng.choice([0.5, 0.8, 0.9, 0.97]))
        budget = int(rng.integers(1, n))
        block = int(rng.choice([1, 16, 128]))
        plain = deita_walk(x, order, budget, tau, block_size=block, index="off")
        for cells in (1, 3, 17):
            indexed = deita_walk(x, order, budget, tau, block_size=block, index="always",
                                 cells=cells)
            where = (case, cells)
            assert np.array_equal(indexed.code, plain.code), where
            assert np.array_equal(indexed.neighbour, plain.neighbour), where
            assert np.array_equal(indexed.selected_order, plain.selected_order), where
