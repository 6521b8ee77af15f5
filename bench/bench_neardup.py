"""Benchmark: near-duplicate removal (`gleaner neardup`) over 1,000,000 examples.

The pool is made of real records (../shared/data: the Alpaca 9k sample, the Alpaca-GPT4
999 sample, Dolly 3k: 13,224 records) multiplied: copy k of a record gets a " (v k)"
suffix counter on its instruction and, for two copies in three, 1-2 light word edits (a
word replaced, dropped or added), so every id is distinct and most copies are near
duplicates of each other (a duplicate-heavy pool: the clustering's hard case). The pool is
written as the run's ingest stage (parts of 50,000 rows); then the real CLI runs as a
child process (``python -m gleaner.flows.cli neardup``: Prefect, a local Ray on every core,
the engine's minhash stage, then the clustering on the driver) with ``--no-cache`` (the
cache would write every signature a second time), and its resident memory is polled every
50 ms. Printed: wall time and throughput, the minhash stage's and the clustering's seconds,
the clusters, and the driver's peak RSS.

    .venv/bin/python bench/bench_neardup.py [--n 1000000] [--batch-size 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_driver_rss import peak_rss  # noqa: E402
from gleaner.runtime import start_prefect_server  # noqa: E402
from gleaner.schema import Example, examples_to_table  # noqa: E402
from gleaner.store import Store  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PART_ROWS = 50_000


def real_records() -> list[dict[str, str]]:
    records = (json.loads((DATA / "alpaca" / "alpaca_random_9k.json").read_text())
               + json.loads((DATA / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json").read_text())
               + json.loads((DATA / "dolly" / "dolly_3k.json").read_text()))
    return [{"instruction": r["instruction"], "input": r.get("input") or "",
             "output": r["output"]} for r in records]


def copy_of(record: dict[str, str], k: int, rng: random.Random, vocabulary: list[str]
            ) -> Example:
    words = record["instruction"].split()
    if k and rng.random() < 2 / 3:
        for _ in range(rng.randint(1, 2)):
            where = rng.randrange(len(words) + 1)
            if where < len(words) and len(words) > 2 and rng.random() < 0.5:
                words[where] = rng.choice(vocabulary)
            else:
                words.insert(where, rng.choice(vocabulary))
    suffix = f" (v {k})" if k else ""
    return Example("bench", k, " ".join(words) + suffix, record["input"], record["output"])


def write_pool(store: Store, run_id: str, n: int) -> None:
    records = real_records()
    rng = random.Random(1)
    vocabulary = [w for r in records[:1000] for w in r["instruction"].split()]
    for part, start in enumerate(range(0, n, PART_ROWS)):
        batch = [copy_of(records[i % len(records)], i // len(records), rng, vocabulary)
                 for i in range(start, min(n, start + PART_ROWS))]
        store.write_part(run_id, "ingest", part, examples_to_table(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-neardup-"))
    store = Store(str(home / "store"))
    write_pool(store, "nd", args.n)
    prefect, api_url = start_prefect_server(home=home / "prefect", log_path=home / "prefect.log")
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled",
           "GLEANER_PROGRESS": "off", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gleaner.flows.cli", "neardup", "--run-id", "nd",
               "--store", store.url, "--batch-size", str(args.batch_size), "--threshold",
               str(args.threshold), "--no-cache", "--json"]
    try:
        peak, seconds, out, err = peak_rss(command, env)
    finally:
        prefect.terminate()
        try:
            prefect.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prefect.kill()
    if not out.strip():
        raise SystemExit(f"gleaner neardup failed:\n{err[-3000:]}")
    s = json.loads(out.strip().splitlines()[-1])
    print(f"{s['examples']:,} examples, {os.cpu_count()} cores, batch {args.batch_size:,}: "
          f"{seconds:.1f} s wall ({s['examples'] / seconds:,.0f} examples/s end to end); "
          f"minhash stage {s['minhash_seconds']:.1f} s ({s['examples'] / s['minhash_seconds']:,.0f}"
          f" examples/s), clustering on the driver {s['cluster_seconds']:.1f} s")
    print(f"  {s['bands']} bands x {s['rows']} rows, threshold {s['threshold']}: "
          f"{s['candidate_pairs']:,} candidate pairs checked, {s['pairs_over_threshold']:,} "
          f"over the threshold; {s['near_duplicates']:,} near duplicates in {s['clusters']:,} "
          f"clusters (largest {s['largest_cluster']:,}), {s['clean']:,} left")
    print(f"  driver peak RSS {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
