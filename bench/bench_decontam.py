"""Benchmark: decontaminate the 9k Alpaca sample against the AlpaGasus test sets and MT-Bench.

The stage's own worker (``DecontaminateStage.open().process``, what every Ray batch runs)
over the ingested sample in batches of ``decontaminate.resources.batch_size``, in this
process: the figures are the rule's, not Prefect's or Ray's. Test sets: vicuna, koala,
wizardlm, sinstruct (AlpaGasus' four) and MT-Bench's first turns, read from
../shared/data/eval_sets. Prints the examples found per test set and rule, the test prompts
they touch, a few of them, and the throughput.

    .venv/bin/python bench/bench_decontam.py [--ngram 13] [--show 8]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from gleaner.config import GleanerConfig
from gleaner.schema import Example, examples_to_table
from gleaner.tasks.decontam.stage import make

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ["vicuna", "koala", "wizardlm", "sinstruct", "mt_bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--show", type=int, default=8, help="found examples to print")
    parser.add_argument("--sample", default=str(DATA / "alpaca" / "alpaca_random_9k.json"))
    args = parser.parse_args()
    records = json.loads(Path(args.sample).read_text())
    pool = examples_to_table([Example("alpaca", i, r["instruction"], r.get("input", ""),
                                      r.get("output", "")) for i, r in enumerate(records)])
    config = GleanerConfig.model_validate({"decontaminate": {
        "test_sets": SETS, "ngram": args.ngram, "test_sets_dir": str(DATA / "eval_sets")}})
    stage = make(config)
    started = time.perf_counter()
    plan = stage.requested()  # the driver: test sets read, index built
    indexed = time.perf_counter() - started
    worker = stage.open()
    size = stage.resources.batch_size
    started = time.perf_counter()
    parts = [worker.process(pool.slice(at, size)) for at in range(0, pool.num_rows, size)]
    seconds = time.perf_counter() - started
    rows = pa.concat_tables(parts).to_pylist()
    found = [r for r in rows if r["contaminated"]]
    prompts = {r["id"]: r for r in pool.select(["id", "instruction", "input"]).to_pylist()}
    index = stage.index
    print(f"pool: {pool.num_rows:,} examples ({Path(args.sample).name}); test prompts: "
          + ", ".join(f"{k} {v}" for k, v in index.sizes.items())
          + f" ({len(index.grams):,} distinct {args.ngram}-grams); fingerprints "
          f"{plan['test_sets']}")
    print(f"index built in {indexed:.2f} s; marking {pool.num_rows / seconds:,.0f} examples/s "
          f"({seconds:.2f} s, one process)")
    print(f"contaminated: {len(found):,} of {pool.num_rows:,} "
          f"({100.0 * len(found) / pool.num_rows:.2f} %), clean {pool.num_rows - len(found):,}")
    print("  by test set:", dict(Counter(r["test_set"] for r in found)))
    print("  by rule:", dict(Counter(r["rule"] for r in found)))
    print("  test prompts touched:", len({(r["test_set"], r["test_id"]) for r in found}))
    for r in found[:args.show]:
        text = prompts[r["id"]]
        prompt = (text["instruction"] + (" | " + text["input"] if text["input"] else ""))[:160]
        print(f"  - [{r['rule']}, {r['test_set']} {r['test_id']}] {prompt!r}\n"
              f"      matched: {r['matched']!r}")


if __name__ == "__main__":
    main()
