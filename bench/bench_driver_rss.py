"""Benchmark: peak RSS of the `gleaner rate` driver process against the pool size.

The driver holds ids and offsets, never the rows: workers read their own batches
from the store. This runs the real CLI (`python -m gleaner.flows.cli rate`) as a
child process, polls its resident memory every 50 ms, and prints the peak per
pool size. Pools are the real Alpaca sample (../shared/data/alpaca/
alpaca_random_9k.json) repeated with a " (copy N)" suffix on the instruction,
so every id is distinct (the 100k and 1M pools are such suffixed copies).

Two ways to rate, chosen per size:
- ``fresh``: every example is rated by a loopback endpoint (bench/rate_stub.py,
  its own processes, no latency);
- ``cached``: every example's rating is already in the cross-run cache (written
  directly), so the driver does its whole job (index the input, look the ids up
  in the cache, submit every batch, summarise) while the workers only copy rows:
  how a weekly refresh of an unchanged pool runs. The default for sizes above
  ``--fresh-up-to`` (1M fresh requests take about an hour on 2 cores).

    .venv/bin/python bench/bench_driver_rss.py [--sizes 10000,100000,1000000]
        [--fresh-up-to 100000] [--batch-size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_rate import start_stub  # noqa: E402
from gleaner import layout  # noqa: E402
from gleaner.config import GleanerConfig  # noqa: E402
from gleaner.engine.plan import settings_key  # noqa: E402
from gleaner.runtime import start_prefect_server  # noqa: E402
from gleaner.schema import Example, examples_to_table  # noqa: E402
from gleaner.store import Store  # noqa: E402
from gleaner.tasks.rate.stage import RATING_SCHEMA, RateStage  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"
PART_ROWS = 50_000


def write_pool(store: Store, run_id: str, n: int) -> list[str]:
    """The ingest stage of ``n`` suffixed Alpaca copies, in parts; returns the ids."""
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    ids: list[str] = []
    for part, start in enumerate(range(0, n, PART_ROWS)):
        batch = []
        for i in range(start, min(n, start + PART_ROWS)):
            r = records[i % len(records)]
            suffix = f" (copy {i // len(records)})" if i >= len(records) else ""
            batch.append(Example(str(ALPACA), i, r["instruction"] + suffix, r.get("input", ""),
                                 r.get("output", "")))
        table = examples_to_table(batch)
        ids += table.column("id").to_pylist()
        store.write_part(run_id, "ingest", part, table)
    return ids


def fill_cache(store: Store, config: GleanerConfig, ids: list[str]) -> None:
    """Ok ratings of every id, where a run with ``config`` looks them up (same stage key)."""
    import pyarrow as pa

    stage = RateStage(config.rate)
    directory = layout.cache_dir(store, "rate", settings_key(stage.requested()))
    base = stage.row_defaults()
    for number, start in enumerate(range(0, len(ids), PART_ROWS)):
        chunk = ids[start:start + PART_ROWS]
        rows = {name: [base[name]] * len(chunk) for name in base}
        table = pa.table({"id": chunk, **rows, "score": [4.0] * len(chunk),
                          "raw": ["4"] * len(chunk), "status": ["ok"] * len(chunk),
                          "error": [None] * len(chunk), "error_kind": [None] * len(chunk),
                          "cached": [False] * len(chunk), "attempts": [1] * len(chunk),
                          "prompt_tokens": [1] * len(chunk), "completion_tokens": [1] * len(chunk),
                          "latency_ms": [1.0] * len(chunk)}).select(RATING_SCHEMA.names)
        store.write_table(layout.cache_file(directory, "prefill", number),
                          table.cast(RATING_SCHEMA))


def peak_rss(command: list[str], env: dict[str, str]) -> tuple[int, float, str, str]:
    """Run ``command``; (peak RSS bytes of that process, seconds, stdout, stderr)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=err)
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return peak, time.perf_counter() - started, out.read(), err.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--fresh-up-to", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    stub, base_url = start_stub(0.0, 2)
    prefect, api_url = start_prefect_server(home=home / "prefect", log_path=home / "prefect.log")
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled",
           "GLEANER_PROGRESS": "off", "PYTHONPATH": str(ROOT)}
    print(f"driver peak RSS of `gleaner rate`; batch size {args.batch_size}; "
          f"os.cpu_count()={os.cpu_count()}")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            store = Store(str(home / f"store-{n}"))
            ids = write_pool(store, "rss", n)
            mode = "fresh" if n <= args.fresh_up_to else "cached"
            config = GleanerConfig().with_overrides({
                "rate.endpoint.base_url": base_url, "rate.endpoint.model": "stub",
                "rate.mode": "explain"})
            if mode == "cached":
                fill_cache(store, config, ids)
            del ids
            command = [sys.executable, "-m", "gleaner.flows.cli", "rate", "--run-id", "rss",
                       "--store", store.url, "--base-url", base_url, "--model", "stub",
                       "--mode", "explain", "--batch-size", str(args.batch_size),
                       "--concurrency", str(args.concurrency), "--json"]
            peak, seconds, out, err = peak_rss(command, env)
            if not out.strip():
                raise SystemExit(f"gleaner rate failed for {n}:\n{err[-3000:]}")
            summary = json.loads(out.strip().splitlines()[-1])
            print(f"{n:>9,} examples ({mode:>6}): peak RSS {peak / 2**20:7.1f} MiB, "
                  f"{seconds:7.1f} s, rated {summary['rated']:,}, from the cache "
                  f"{summary['cached']:,}, {summary['batches']} batches", flush=True)
    finally:
        for process in (prefect, stub):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
