"""Benchmark: self-instruct's ROUGE-L filter as the pool grows to 20,000, against Alpaca's loop.

The generator is a loopback OpenAI-compatible server (tests/support/openai_server.py) that
answers each self-instruct request in Alpaca's numbered format with the next 16 instructions
of a stream: the real Alpaca instructions (../shared/data: the 9k sample and the GPT-4-LLM 999,
deduplicated) and, to reach 20,000, two splices of each (its first half, the second half of
another one; the data README allows multiplying records): mostly distinct at the 0.7 line,
with near duplicates among them that the filter must catch.

Printed:
- the run: ``run_self_instruct`` end to end (rounds of ``--requests-per-round`` requests,
  parse, Alpaca's filters, the ROUGE-L index, a Parquet part per round, the ingest), its wall
  time and the seconds it spent in the ROUGE-L filter;
- per 1,000 kept, as the pool grows: the index's seconds (replaying the run's own candidate
  sequence, decisions checked equal to the run's), and Alpaca's all-pairs loop (rouge-score's
  ``_score_lcs`` against every pool entry, pre-tokenised as Alpaca did, single process) on the
  same candidates: over the whole first ``--naive-full`` kept (kept sets compared), and on a
  window of ``--window`` candidates at larger pool sizes (decisions compared), with the total
  to 20,000 estimated from those windows (the loop itself would take hours here).

    .venv/bin/python bench/bench_selfinstruct.py [--count 20000] [--naive-full 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gleaner import layout  # noqa: E402
from gleaner.config import GleanerConfig  # noqa: E402
from gleaner.store import Store  # noqa: E402
from gleaner.tasks.generate.rouge import RougeIndex, all_pairs_best, tokenize  # noqa: E402
from gleaner.tasks.generate.seeds import load_seed_tasks  # noqa: E402
from gleaner.tasks.generate.selfinstruct import REQUEST_SCHEMA, run_self_instruct  # noqa: E402
from tests.support.openai_server import OpenAIStub, Reply  # noqa: E402
from tests.support.selfinstruct_stub import is_probe, numbered, task  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SEEDS = DATA / "alpaca_seed" / "seed_tasks.jsonl"


def instruction_stream(seed: int = 0, per_base: int = 2) -> list[str]:
    texts: list[str] = []
    for name in ("alpaca/alpaca_random_9k.json", "alpaca_gpt4/alpaca_gpt4_sample_999.json"):
        texts += [r["instruction"] for r in json.loads((DATA / name).read_text())]
    bases = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    rng = random.Random(seed)
    stream = list(bases)
    for _ in range(per_base):  # the first half of one real instruction, the end of another
        for text in bases:
            head, tail = text.split(), rng.choice(bases).split()
            stream.append(" ".join(head[: (len(head) + 1) // 2] + tail[len(tail) // 2:]))
    rng.shuffle(stream)
    return stream


class StreamResponder:
    """The next 16 instructions of the stream per answer (Alpaca's list, 4..19)."""

    def __init__(self, stream: list[str]):
        self.stream, self.at, self.lock = stream, 0, threading.Lock()

    def __call__(self, body: dict) -> Reply:
        if is_probe(body):
            return Reply("OK")
        with self.lock:
            chunk = [self.stream[(self.at + i) % len(self.stream)] for i in range(16)]
            self.at += 16
        pieces = [task(4 + i, text, output="An answer.") for i, text in enumerate(chunk)]
        return Reply(numbered([*pieces, "\n"]))


def checked_candidates(store: Store, run_id: str) -> list[tuple[str, bool]]:
    """(instruction, kept) of every candidate that reached the ROUGE-L filter, in order."""
    table = store.read_stage(run_id, layout.GENERATE, columns=["round", "request", "tasks"],
                             schema=REQUEST_SCHEMA)
    rows = sorted(table.to_pylist(), key=lambda r: (r["round"], r["request"]))
    return [(t["instruction"], t["status"] == "kept") for r in rows for t in r["tasks"]
            if t["status"] == "kept" or t["reason"] in ("near_duplicate", "duplicate")]


def replay_index(seeds: list[str], candidates: list[tuple[str, bool]], every: int
                 ) -> tuple[list[float], list[int]]:
    """The index on the run's candidates: seconds per ``every`` kept; the pool sizes
    (kept so far) before each candidate, for the naive windows."""
    index = RougeIndex(0.7)
    for text in seeds:
        index.add(tokenize(text))
    per_bucket, bucket_started, kept, kept_before = [], time.perf_counter(), 0, []
    for text, was_kept in candidates:
        kept_before.append(kept)
        tokens = tokenize(text)
        keep = index.best_match(tokens) is None
        if keep != was_kept:
            raise AssertionError(f"the replayed index disagrees with the run on {text!r}")
        if keep:
            index.add(tokens)
            kept += 1
            if kept % every == 0:
                now = time.perf_counter()
                per_bucket.append(now - bucket_started)
                bucket_started = now
    return per_bucket, kept_before


def naive(pool: list[list[str]], candidates: list[tuple[str, bool]]) -> tuple[float, int, int]:
    """Alpaca's loop on ``candidates`` from ``pool``: seconds, kept, disagreements."""
    pool = list(pool)
    started, kept, wrong = time.perf_counter(), 0, 0
    for text, was_kept in candidates:
        tokens = tokenize(text)
        keep = all_pairs_best(tokens, pool, 0.7) is None
        wrong += keep != was_kept
        if keep:
            kept += 1
            pool.append(tokens)
    return time.perf_counter() - started, kept, wrong


def indexed(pool: list[list[str]], candidates: list[tuple[str, bool]]
            ) -> tuple[float, int, int]:
    """The index on the same: seconds (building the pool's index not counted), kept, wrong."""
    index = RougeIndex(0.7)
    for tokens in pool:
        index.add(tokens)
    started, kept, wrong = time.perf_counter(), 0, 0
    for text, was_kept in candidates:
        tokens = tokenize(text)
        keep = index.best_match(tokens) is None
        wrong += keep != was_kept
        if keep:
            kept += 1
            index.add(tokens)
    return time.perf_counter() - started, kept, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--requests-per-round", type=int, default=50)
    parser.add_argument("--naive-full", type=int, default=1_000)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--at", default="2500,5000,10000,19000",
                        help="pool sizes (kept) of the naive windows")
    args = parser.parse_args()
    seeds = [t.instruction for t in load_seed_tasks(str(SEEDS))]
    stream = instruction_stream()
    store = Store(tempfile.mkdtemp(prefix="bench-selfinstruct-"))
    with OpenAIStub(StreamResponder(stream)) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": store.url, "generate.endpoint.base_url": stub.base_url,
            "generate.endpoint.model": "stub", "generate.endpoint.max_retries": 0,
            "generate.requests_per_round": args.requests_per_round,
            "generate.resources.concurrency": args.requests_per_round})
        started = time.perf_counter()
        summary = run_self_instruct(config, "bench", str(SEEDS), args.count)
        wall = time.perf_counter() - started
    print(f"stream: {len(stream):,} instructions; the run: {summary['kept']:,} kept of "
          f"{summary['candidates']:,} candidates ({summary['filtered']}) in {summary['rounds']} "
          f"rounds, {summary['prompts']:,} requests, {wall:.1f}s wall, "
          f"{summary['rouge_seconds']:.2f}s in the ROUGE-L filter "
          f"({summary['rouge_exact_scores']:,} exact ROUGE-L scores for "
          f"{summary['rouge_checks']:,} checks)")

    candidates = checked_candidates(store, "bench")
    per_bucket, kept_before = replay_index(seeds, candidates, 1000)
    print("\nindex (replayed on the run's candidates, decisions equal to the run's):")
    for number, seconds in enumerate(per_bucket):
        print(f"  kept {number * 1000:>6,}-{(number + 1) * 1000:>6,}: {seconds:6.3f} s")
    print(f"  total to {len(per_bucket) * 1000:,} kept: {sum(per_bucket):.2f} s")

    seed_tokens = [tokenize(s) for s in seeds]
    kept_texts = [text for text, was_kept in candidates if was_kept]
    first = [c for c, before in zip(candidates, kept_before, strict=True)
             if before < args.naive_full]
    seconds, kept, wrong = naive(seed_tokens, first)
    fast, fast_kept, fast_wrong = indexed(seed_tokens, first)
    print(f"\nthe first {args.naive_full:,} kept ({len(first):,} candidates), same kept set: "
          f"{kept == fast_kept and wrong == fast_wrong == 0}")
    print(f"  Alpaca's all-pairs loop: {seconds:.1f} s ({seconds / max(1, kept) * 1000:.1f} s "
          f"per 1,000 kept); the index: {fast:.3f} s ({seconds / fast:.0f}x faster)")
    rates = [(args.naive_full / 2, seconds / max(1, kept) * 1000)]
    print(f"\nwindows of {args.window} candidates at larger pools (decisions compared):")
    print("  pool kept | naive s/1000 kept | index s/1000 kept | x faster   (index: the replay's "
          "1,000 kept from there)")
    for at in (int(x) for x in args.at.split(",")):
        start = next((i for i, before in enumerate(kept_before) if before >= at), None)
        if start is None:
            continue
        window = candidates[start:start + args.window]
        pool = seed_tokens + [tokenize(t) for t in kept_texts[:kept_before[start]]]
        seconds, kept, wrong = naive(pool, window)
        _, _, fast_wrong = indexed(pool, window)
        rate = seconds / max(1, kept) * 1000
        index_rate = per_bucket[min(len(per_bucket) - 1, at // 1000)]  # its 1,000 around `at`
        rates.append((at, rate))
        print(f"  {at:>9,} | {rate:17.1f} | {index_rate:17.3f} | {rate / index_rate:8.0f}"
              f"   ({kept}/{len(window)} kept; differ: naive {wrong}, index {fast_wrong})")
    # the naive rate grows linearly with the pool: integrate the measured points
    total, previous = 0.0, (0.0, rates[0][1])
    for at, rate in sorted(rates) + [(float(args.count), rates[-1][1] * args.count /
                                      max(1.0, rates[-1][0]))]:
        total += (at - previous[0]) / 1000 * (rate + previous[1]) / 2
        previous = (at, rate)
    print(f"\nAlpaca's loop to {args.count:,} kept, estimated from the windows: {total:,.0f} s "
          f"({total / 3600:.1f} h); the index: {sum(per_bucket):.1f} s")


if __name__ == "__main__":
    main()
