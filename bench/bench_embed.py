"""Benchmark: embeddings/s of the Ray actor pool vs a bare in-process encode loop.

The same 10,000 real texts (the 9,229 Alpaca examples plus the first 771 of the
Alpaca-GPT4 sample, as the conversation text the embed stage uses), the same
model (all-MiniLM-L6-v2, mean pooling) and the same CPUs. Model loading is
timed separately and left out of both rates. Target: pool >= 0.9x in-process.
On two shared cores the model's own 256-token limit makes each side take ~15
minutes for 10,000 texts; ``--max-length 64`` keeps the comparison (same texts,
same model, same truncation on both sides) to a few minutes.

    .venv/bin/python bench/bench_embed.py [--n 10000] [--actors 1] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from gleaner.schema import Example
from gleaner.tasks.deita.embed import (
    Encoder,
    actor_pool,
    embed_on_pool,
    example_text,
    length_batches,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_texts(n: int) -> list[str]:
    records = json.loads((DATA / "alpaca" / "alpaca_random_9k.json").read_text())
    records += json.loads((DATA / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json").read_text())
    examples = [Example("bench", i, r["instruction"], r.get("input", ""), r["output"])
                for i, r in enumerate(records[:n])]
    if len(examples) < n:
        raise SystemExit(f"only {len(examples)} real records available, asked for {n}")
    return [example_text(e.to_row()) for e in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                        help="CPUs for the in-process loop and, in total, for the pool")
    parser.add_argument("--batch", type=int, default=256, help="texts per actor call")
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = load_texts(args.n)
    ids = [f"t{i:05d}" for i in range(len(texts))]
    print(f"{len(texts):,} texts, {args.cpus} CPUs, {os.cpu_count()} on the machine")

    torch.set_num_threads(args.cpus)
    t0 = time.perf_counter()
    encoder = Encoder(max_length=args.max_length)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    local = encoder.encode(texts)
    bare = time.perf_counter() - t0
    print(f"in-process loop : load {load:5.1f} s, encode {bare:6.1f} s = "
          f"{len(texts) / bare:7.1f} embeddings/s")

    import numpy as np
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        t0 = time.perf_counter()
        pool, actors = actor_pool(args.actors, None, "mean", args.max_length,
                                  num_cpus=args.cpus / args.actors)
        start = time.perf_counter() - t0
        batches = [(i, b_ids, b_texts) for i, (b_ids, b_texts)
                   in enumerate(length_batches(ids, texts, args.batch))]
        t0 = time.perf_counter()
        out: dict[str, np.ndarray] = {}
        for _, b_ids, vectors in embed_on_pool(pool, batches):
            out.update(zip(b_ids, vectors, strict=True))
        pooled = time.perf_counter() - t0
        for actor in actors:
            ray.kill(actor)
    finally:
        ray.shutdown()
    print(f"Ray actor pool  : start {start:5.1f} s, encode {pooled:6.1f} s = "
          f"{len(texts) / pooled:7.1f} embeddings/s  ({args.actors} actor(s), "
          f"{args.batch} texts per call)")
    same = np.allclose(np.stack([out[i] for i in ids]), local, atol=1e-5)
    ratio = bare / pooled
    verdict = "met" if ratio >= 0.9 else "MISSED"
    print(f"pool / in-process = {ratio:.2f}x (target >= 0.9x: {verdict}); "
          f"vectors identical: {same}")


if __name__ == "__main__":
    main()
