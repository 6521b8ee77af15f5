"""Viewer benchmark: `gleaner view` over a 1,000,000-example run; page times and server RSS.

The full Alpaca 52k is not on these machines, so the pool is the real Alpaca records of
../shared/data/alpaca/alpaca_random_9k.json repeated, each copy's instruction suffixed with
a counter so every id differs. The run is made as a real one is laid out: the real ingest
(parts of ``ingest.batch_rows``), a rating stage in parts of 512 rows (the rating's default
batch) written with the stage's schema (scores and raw answers; 1 % failed rows with their
error), and the real selection (``threshold`` at 4.5 over the rating) writing the manifest.
Then `gleaner view` is started as a person starts it (a child process), and the bench times
over HTTP: the first page, a filtered page (reason ``below_threshold`` and rating in
[3, 4], sorted by rating), a deep page, a failed-rows page, an example's page, a text search
(the first, which scans the pool, then a next page of it, which does not). Peak server RSS
is the child's VmHWM.

    .venv/bin/python bench/bench_viewer.py [--records N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"
RUN_ID = "bench-view"
RATE_BATCH = 512


def write_source(path: Path, records: int) -> None:
    base = json.loads(ALPACA.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as out:
        for i in range(records):
            record = dict(base[i % len(base)])
            record["instruction"] = f"{record['instruction']} (#{i})"
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_run(store_dir: Path, records: int) -> dict[str, float]:
    import numpy as np
    import pyarrow as pa

    from gleaner import layout
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.ingest.ingest import run_ingest
    from gleaner.tasks.rate.stage import RATING_SCHEMA, histogram
    from gleaner.tasks.select.stage import select_examples

    timings = {}
    source = store_dir.parent / "pool.jsonl"
    started = time.perf_counter()
    write_source(source, records)
    config = GleanerConfig().with_overrides({"store.url": str(store_dir),
                                             "select.selector": "threshold",
                                             "select.sort_by": "rating",
                                             "select.threshold": 4.5})
    store = Store(str(store_dir))
    run_ingest([str(source)], store, RUN_ID, config)
    source.unlink()
    timings["ingest_s"] = time.perf_counter() - started

    started = time.perf_counter()
    ids = store.read_stage(RUN_ID, layout.INGEST, columns=["id"])["id"]
    rng = np.random.default_rng(0)
    scores = rng.choice(np.arange(0, 11) / 2, size=len(ids),
                        p=[.01, .01, .02, .03, .05, .08, .15, .2, .2, .15, .1])
    failed = rng.random(len(ids)) < 0.01
    for number, start in enumerate(range(0, len(ids), RATE_BATCH)):
        stop = min(start + RATE_BATCH, len(ids))
        n = stop - start
        bad = failed[start:stop]
        score = pa.array(scores[start:stop], pa.float64(), mask=bad)
        raw = [None if b else f"The answer is helpful and accurate.\nScore: {s}"
               for s, b in zip(scores[start:stop], bad, strict=True)]
        table = pa.table({
            "id": ids.slice(start, n), "dimension": ["accuracy"] * n, "model": ["bench"] * n,
            "prompt_version": ["v1"] * n, "mode": ["explain"] * n, "score": score,
            "raw": raw, "status": np.where(bad, "failed", "ok").tolist(),
            "error": [("parse: no score in the answer" if b else None) for b in bad],
            "error_kind": [("parse" if b else None) for b in bad], "cached": [False] * n,
            "attempts": [1] * n, "prompt_tokens": [120] * n, "completion_tokens": [30] * n,
            "latency_ms": [0.0] * n}).cast(RATING_SCHEMA)
        store.write_part(RUN_ID, layout.RATE, number, table)
    ok = scores[~failed]
    store.write_json(layout.summary_path(store, RUN_ID, layout.RATE), {
        "run_id": RUN_ID, "stage": layout.RATE, "examples": len(ids), "ok": int(ok.size),
        "failed": int(failed.sum()), "read": len(ids), "rated": int(ok.size),
        "kept": int((ok >= 4.5).sum()), "below": int((ok < 4.5).sum()), "threshold": 4.5,
        "histogram": histogram(ok)})
    timings["rate_parts_s"] = time.perf_counter() - started
    started = time.perf_counter()
    select_examples(store, RUN_ID, config)
    timings["select_s"] = time.perf_counter() - started
    return timings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(client: httpx.Client, path: str, params: list[tuple[str, str]]) -> tuple[float, dict]:
    started = time.perf_counter()
    answer = client.get(path, params=params)
    seconds = time.perf_counter() - started
    answer.raise_for_status()
    return seconds, answer.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", help="build (or reuse) the run in this folder")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-view-"))
    store_dir = folder / "store"
    figures: dict[str, object] = {"records": args.records}
    if not (store_dir / "runs" / RUN_ID / "select" / "_summary.json").exists():
        store_dir.mkdir(parents=True, exist_ok=True)
        figures.update(build_run(store_dir, args.records))

    port = free_port()
    gleaner = str(Path(sys.executable).parent / "gleaner")
    started = time.perf_counter()
    server = subprocess.Popen([gleaner, "view", "--run-id", RUN_ID, "--store", str(store_dir),
                               "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"gleaner view exited: {server.stdout.read()}")
                try:
                    client.get("/api/run").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            figures["server_ready_s"] = time.perf_counter() - started
            figures["rss_after_start_mib"] = peak_rss_mib(server.pid)
            cases = {
                "first_page": [("limit", "50")],
                "filtered_page": [("is", "reason,below_threshold"), ("range", "rating,3,4"),
                                  ("sort", "rating"), ("desc", "1"), ("limit", "50")],
                "filtered_page_2": [("is", "reason,below_threshold"), ("range", "rating,3,4"),
                                    ("sort", "rating"), ("desc", "1"), ("limit", "50"),
                                    ("offset", "50")],
                "deep_page": [("limit", "50"), ("offset", str(args.records // 2))],
                "failed_rows": [("is", "status:rate,failed"), ("limit", "50")],
                "sorted_by_rating": [("sort", "rating"), ("limit", "50")],
                "search_first": [("q", "poem"), ("limit", "50")],
                "search_next_page": [("q", "poem"), ("limit", "50"), ("offset", "50")],
            }
            for name, params in cases.items():
                seconds, page = timed(client, "/api/pool", params)
                figures[f"{name}_s"] = round(seconds, 3)
                figures[f"{name}_total"] = page["total"]
                if name == "first_page":
                    first_id = page["rows"][0]["id"]
            seconds, _ = timed(client, f"/api/example/{first_id}", [])
            figures["example_page_s"] = round(seconds, 3)
            seconds, _ = timed(client, "/api/counts", [])
            figures["counts_s"] = round(seconds, 3)
        figures["peak_server_rss_mib"] = round(peak_rss_mib(server.pid), 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}
    figures["cpus"] = os.cpu_count()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
