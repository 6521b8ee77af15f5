"""Fine-tuning benchmark: SmolLM2-135M (the offline default, de-quantised from the shipped GGUF)
on real Alpaca records through the real Ray Train path; prints tokens/s, wall time, peak GPU
memory (on a GPU) and the loss curve.

The "curated" sample is the first N records of ../shared/data/alpaca/alpaca_random_9k.json
(a random subset of Alpaca 52k: the set AlpaGasus' 9k filter kept has the same size).
On a CPU box keep --max-steps small; on a GPU run it with --gpu (bf16 autocast).

    .venv/bin/python bench/bench_finetune.py [--examples 256] [--max-steps 8] [--gpu]
        [--num-workers 1] [--preset alpaca|lima] [--batch 16] [--micro 4] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--preset", default="alpaca", choices=["alpaca", "lima"])
    parser.add_argument("--batch", type=int, default=16, help="effective batch size")
    parser.add_argument("--micro", type=int, default=4, help="per-device batch size")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--base-model", default=None, help="HF id / folder / .gguf")
    parser.add_argument("--store", default=None, help="store URL (default: a temp folder)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.flows.finetune_flow import resolve_base_model, run_finetune
    from gleaner.runtime import init_ray
    from gleaner.schema import Example
    from gleaner.store import Store

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[: args.examples]
    table = pa.Table.from_pylist([Example(str(ALPACA), i, r["instruction"], r["input"],
                                          r["output"]).to_row() for i, r in enumerate(rows)])
    started = time.perf_counter()
    base = resolve_base_model(args.base_model)
    prepared = time.perf_counter() - started
    overrides = {"max_steps": args.max_steps, "effective_batch_size": args.batch,
                 "per_device_batch_size": args.micro, "max_length": args.max_length,
                 "checkpoint_every_steps": max(1, args.max_steps)}
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as scratch:
        url = args.store or str(Path(scratch) / "store")
        config = GleanerConfig().with_overrides({
            "store.url": url, "finetune.base_model": base, "finetune.preset": args.preset,
            "finetune.overrides": overrides, "finetune.num_workers": args.num_workers,
            "finetune.use_gpu": args.gpu, "finetune.cpus_per_worker": args.cpus_per_worker,
            "finetune.force": True})
        init_ray(config)
        summary = run_finetune(Store(url), "bench", config, table, name="curated")
        metrics = Store(url).read_json(Store(url).run_path("bench", "finetune", "curated",
                                                           "metrics.json"))
    gpu = metrics.get("gpu_max_memory_bytes")
    print(f"model: {args.base_model or 'SmolLM2-135M-Instruct (GGUF, de-quantised)'}; "
          f"base model ready in {prepared:.1f} s")
    print(f"data: {summary['data']}")
    print(f"device: {metrics['device']} x{metrics['world_size']}, bf16={metrics['bf16']}, "
          f"grad accumulation {metrics['gradient_accumulation']}")
    print(f"steps: {metrics['steps']}, tokens: {metrics['tokens']}, "
          f"train {metrics['train_seconds']:.1f} s, tokens/s {metrics['tokens_per_s']}")
    print(f"wall (Ray Train fit, incl. worker start and checkpoints): "
          f"{metrics['wall_seconds']:.1f} s")
    print(f"peak GPU memory: {'n/a (CPU)' if gpu is None else f'{gpu / 2**30:.2f} GiB'}")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print("loss: " + " ".join(f"{h['loss']:.3f}" for h in metrics["history"]))


if __name__ == "__main__":
    main()
