"""Benchmark: DEITA selection of 6,000 from 300,000 synthetic clustered 384-d embeddings.

Two data sets (tau = 0.9):
- light: 30,000 cluster centres, points spread so that few are rejected;
- duplicate-heavy: 3,000 centres, tight clusters, so the walk must scan and
  reject most of the pool before the budget fills.

Printed per set: the blocked selector's time; a plain sequential loop (one row
at a time against a preallocated selected matrix, the best one can do row by
row); and DEITA's own loop (IterativeFilter.filter with batch_size=1: per row
it gathers the selected embeddings by index, normalises both sides and
multiplies, in torch), extrapolated from a prefix where it would take too long.
Asserts that the selected ids are identical.

    .venv/bin/python bench/bench_select.py [--n 300000] [--deita-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from tasks.select import deita_walk, select_deita, unit_rows

DIM = 384


def make_set(
    n: int, centres: int, spread: float, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Points = centre + spread * N(0, I/d), float32; scores uniform in [1, 36] (c*q range)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, DIM), dtype=np.float32)
    step = 50_000
    for start in range(0, n, step):
        m = min(step, n - start)
        assign = rng.integers(0, centres, m)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(spread / np.sqrt(DIM))
        x[start : start + m] = c[assign] + noise
    scores = rng.uniform(1, 36, n)
    ids = [f"{i:08d}" for i in range(n)]
    return ids, scores, x


def order_of(ids: list[str], scores: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(ids)), -scores))  # ids are zero-padded ints: same as by id


def plain_sequential(unit_sorted: np.ndarray, budget: int, tau: float) -> tuple[list[int], float]:
    """One row at a time against a preallocated selected matrix (float32 products).

    Rows whose float32 max is within 1e-4 of tau are re-checked in float64, as
    the selector's definition says (this never triggers in practice)."""
    t0 = time.perf_counter()
    S = np.empty((budget, unit_sorted.shape[1]), dtype=np.float32)
    chosen: list[int] = []
    k = 0
    for pos in range(len(unit_sorted)):
        if k == budget:
            break
        x = unit_sorted[pos]
        if k:
            m = float((S[:k] @ x).max())
            if abs(m - tau) <= 1e-4:
                m = float((S[:k].astype(np.float64) @ x.astype(np.float64)).max())
            if m > tau:
                continue
        S[k] = x
        k += 1
        chosen.append(pos)
    return chosen, time.perf_counter() - t0


def deita_loop(
    unit_sorted: np.ndarray, budget: int, tau: float, seconds: float
) -> tuple[list[int], int, float, list[tuple[int, float]]]:
    """DEITA's IterativeFilter.filter (batch_size=1), stopped after ``seconds``.

    Returns chosen rows, rows processed, elapsed, and (k, seconds) samples per
    row so the rest can be extrapolated."""
    import torch

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    chosen = [0]
    samples: list[tuple[int, float]] = []
    pos = 1
    n = len(unit_sorted)
    while pos < n and len(chosen) < budget:
        t_row = time.perf_counter()
        cur = torch.tensor(unit_sorted[pos : pos + 1], dtype=torch.float32)
        existing = torch.tensor(unit_sorted[chosen], dtype=torch.float32)
        cur_n = cur / cur.norm(dim=1)[:, None]
        ex_n = existing / existing.norm(dim=1)[:, None]
        dist = torch.mm(cur_n, ex_n.t())
        if not bool(torch.any(dist > tau)):
            chosen.append(pos)
        pos += 1
        samples.append((len(chosen), time.perf_counter() - t_row))
        if time.perf_counter() - t0 > seconds:
            break
    return chosen, pos, time.perf_counter() - t0, samples


def extrapolate(samples: list[tuple[int, float]], k_at: np.ndarray, processed: int) -> float:
    """Fit seconds-per-row = a + b*k on the measured prefix; sum over the remaining rows."""
    k = np.array([s[0] for s in samples], dtype=np.float64)
    t = np.array([s[1] for s in samples], dtype=np.float64)
    A = np.stack([np.ones_like(k), k], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, t, rcond=None)
    rest = k_at[processed:]
    return float(t.sum() + np.sum(a + b * rest))


def run(name: str, centres: int, spread: float, n: int, budget: int, tau: float,
        deita_seconds: float) -> dict[str, float]:
    ids, scores, x = make_set(n, centres, spread, seed=centres)
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = select_deita(ids, scores, x, budget=budget, tau=tau)
    fast, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = manifest.counts()
    # The same inputs the selector walks: float32 unit rows in score order.
    unit, _ = unit_rows(x)
    order = order_of(ids, scores)
    unit_sorted = np.ascontiguousarray(unit[order])
    del unit
    t0 = time.perf_counter()
    walk = deita_walk(unit_sorted, np.arange(len(unit_sorted)), budget, tau)
    walk_only = time.perf_counter() - t0
    chosen, seq = plain_sequential(unit_sorted, budget, tau)
    assert list(walk.selected_order) == chosen, f"{name}: walk on prepared rows disagrees"
    seq_ids = [ids[order[p]] for p in chosen]
    assert seq_ids == manifest.selected_ids, f"{name}: plain sequential loop disagrees"
    # k after each walk position (for extrapolating DEITA's loop).
    walked = np.zeros(len(order), dtype=bool)
    walked[chosen] = True
    last = chosen[-1] + 1 if chosen else 0
    k_at = np.cumsum(walked)[:last]
    d_chosen, processed, d_time, samples = deita_loop(unit_sorted, budget, tau, deita_seconds)
    prefix_ids = [ids[order[p]] for p in d_chosen]
    assert prefix_ids == manifest.selected_ids[: len(prefix_ids)], (
        f"{name}: DEITA's loop disagrees on the prefix it ran")
    if processed >= last:
        d_total, note = d_time, "measured"
    else:
        d_total = extrapolate(samples, k_at, processed)
        note = f"extrapolated from {processed:,} of {last:,} rows ({d_time:.0f} s)"
    print(
        f"{name:16s} scanned {last:>7,} rows, kept {counts['kept']:,}, too_similar "
        f"{counts['too_similar']:,}, over_budget {counts['over_budget']:,}\n"
        f"{'':16s} blocked selector      {fast:8.2f} s  (CPU {fast_cpu:.2f} s)\n"
        f"{'':16s}   of which the walk   {walk_only:8.2f} s  (same prepared rows as the loops)\n"
        f"{'':16s} plain sequential loop {seq:8.2f} s  ({seq / fast:6.1f}x; "
        f"{seq / walk_only:.1f}x the walk)  ids identical\n"
        f"{'':16s} DEITA's own loop      {d_total:8.2f} s  ({d_total / fast:6.1f}x)  {note}"
    )
    return {"fast": fast, "sequential": seq, "deita": d_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--budget", type=int, default=6000)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--deita-seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"DEITA selection benchmark: {args.n:,} x {DIM} float32, budget {args.budget:,}, "
          f"tau {args.tau}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    light = run("light", 30_000, 0.34, args.n, args.budget, args.tau, args.deita_seconds)
    heavy = run("duplicate-heavy", 3_000, 0.312, args.n, args.budget, args.tau, args.deita_seconds)
    print(f"targets: light <= 2 s: {'met' if light['fast'] <= 2 else 'MISSED'}; "
          f">= 50x the sequential loop: light {light['sequential'] / light['fast']:.1f}x / "
          f"{light['deita'] / light['fast']:.1f}x (DEITA's), heavy "
          f"{heavy['sequential'] / heavy['fast']:.1f}x / {heavy['deita'] / heavy['fast']:.1f}x")


if __name__ == "__main__":
    main()
