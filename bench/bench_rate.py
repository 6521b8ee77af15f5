"""Benchmark: the rating stage against a bare asyncio + AsyncOpenAI loop, same total concurrency.

The endpoint is bench/rate_stub.py: a plain ASGI server with a fixed latency
(100 ms by default) in its own uvicorn processes, so it is not the bottleneck.
The examples are real Alpaca records (../shared/data/alpaca/alpaca_random_9k.json)
repeated with a counter suffix up to ``--n`` (20,000), so every id is distinct.

Printed:
- bare loop: one process, one AsyncOpenAI client, ``--concurrency`` requests in
  flight, the same prompt building and score parsing; run before and after the
  stage (the box may be shared) and compared by their mean;
- the stage: ``rate_flow`` (Prefect flow, one task per batch through
  RayTaskRunner on the stage engine: workers read their batch from the store,
  Parquet part per batch, cache writes) with the same total
  concurrency split over the batches in flight (Ray CPUs / task_cpus);
  Ray and the Prefect API are started before the clock, and a small warm-up
  run starts the Ray workers;
- per-batch orchestration overhead: (wall x batches in flight - time inside
  the batch tasks) / batches: Prefect task run bookkeeping, Ray dispatch.

    .venv/bin/python bench/bench_rate.py [--n 20000] [--concurrency 64] [--task-cpus 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gleaner.config import GleanerConfig  # noqa: E402
from gleaner.runtime import free_port, prefect_api, start_prefect_server  # noqa: E402
from gleaner.schema import Example, examples_to_table  # noqa: E402
from gleaner.store import Store  # noqa: E402
from gleaner.tasks.rate.parse import parse_score  # noqa: E402
from gleaner.tasks.rate.prompt import build_prompt  # noqa: E402
from gleaner.tasks.rate.stage import RateStage  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"


def load_examples(n: int) -> list[Example]:
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    out = []
    for i in range(n):
        r = records[i % len(records)]
        suffix = f" (copy {i // len(records)})" if i >= len(records) else ""
        out.append(Example(source=str(ALPACA), source_row=i, instruction=r["instruction"] + suffix,
                           input=r.get("input", ""), output=r.get("output", "")))
    return out


def start_stub(delay_s: float, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, RATE_STUB_DELAY_S=str(delay_s))
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "rate_stub:app", "--app-dir", str(ROOT / "bench"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--log-level", "warning", "--no-access-log", "--backlog", "4096"],
        env=env, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("bench stub did not start")


async def bare_loop(rows: list[dict], base_url: str, concurrency: int) -> float:
    """The baseline: what a careful one-off script would do."""
    import openai

    prompt = build_prompt()
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=2, timeout=60)
    semaphore = asyncio.Semaphore(concurrency)
    ok = 0

    async def one(row: dict) -> None:
        nonlocal ok
        async with semaphore:
            response = await client.chat.completions.create(
                model="stub", messages=prompt.messages(row), max_tokens=256, temperature=0
            )
        ok += parse_score(response.choices[0].message.content).ok

    started = time.perf_counter()
    await asyncio.gather(*(one(r) for r in rows))
    elapsed = time.perf_counter() - started
    await client.close()
    assert ok == len(rows), f"bare loop rated {ok} of {len(rows)}"
    return elapsed


def stage_config(store: Store, base_url: str, args: argparse.Namespace) -> GleanerConfig:
    slots = max(1, int(args.ray_cpus / args.task_cpus))
    return GleanerConfig().with_overrides({
        "store.url": store.url,
        "rate.endpoint.base_url": base_url,
        "rate.endpoint.model": "stub",
        "rate.resources.concurrency": max(1, args.concurrency // slots),
        "rate.mode": "explain",
        "rate.resources.batch_size": args.batch_size,
        "rate.resources.cpus": args.task_cpus,
        "rate.cache": False,
        "ray.num_cpus": args.ray_cpus,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64, help="total requests in flight")
    parser.add_argument("--delay", type=float, default=0.1, help="endpoint latency, seconds")
    default_batch = RateStage.declared.batch_size
    parser.add_argument("--batch-size", type=int, default=default_batch,
                        help="examples per batch (default: the rating stage's)")
    parser.add_argument("--task-cpus", type=float, default=1.0)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--stub-workers", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    examples = load_examples(args.n)
    rows = [e.to_row() for e in examples]
    slots = max(1, int(args.ray_cpus / args.task_cpus))
    print(f"rating {args.n} examples, endpoint latency {args.delay * 1000:.0f} ms, total "
          f"concurrency {args.concurrency}; stage: {slots} batches in flight x "
          f"{max(1, args.concurrency // slots)} requests, batch size {args.batch_size}, "
          f"os.cpu_count()={os.cpu_count()}")

    home = Path(tempfile.mkdtemp(prefix="bench-rate-"))
    stub, base_url = start_stub(args.delay, args.stub_workers)
    prefect_process, api_url = start_prefect_server(home=home / "prefect",
                                                    log_path=home / "prefect.log")
    try:
        # the box may be shared: the bare loop runs before and after the stage, and the
        # stage is compared with the mean of the two
        bare_before = asyncio.run(bare_loop(rows, base_url, args.concurrency))
        print(f"bare asyncio+AsyncOpenAI loop : {args.n / bare_before:8.1f} examples/s "
              f"({bare_before:.1f} s, before the stage)", flush=True)

        import ray

        from gleaner.flows.rate_flow import rate_flow
        from gleaner.runtime import init_ray

        store = Store(str(home / "store"))
        with prefect_api(api_url):
            config = stage_config(store, base_url, args)
            init_ray(config)
            # warm-up: start the Ray workers and import Prefect in them (a one-off per session)
            warm = rows[: args.batch_size * slots]
            store.write_part("warmup", "ingest", 0, examples_to_table(examples[: len(warm)]))
            cold = time.perf_counter()
            rate_flow(run_id="warmup", config=config)
            print(f"warm-up ({len(warm)} examples, cold Ray workers): "
                  f"{time.perf_counter() - cold:.1f} s", flush=True)

            for start in range(0, args.n, 50_000):
                part = examples_to_table(examples[start:start + 50_000])
                store.write_part("bench", "ingest", start // 50_000, part)
            started = time.perf_counter()
            summary = rate_flow(run_id="bench", config=config)
            stage_s = time.perf_counter() - started
            ray.shutdown()
        assert summary["rated"] == args.n, summary
        bare_after = asyncio.run(bare_loop(rows, base_url, args.concurrency))
        print(f"bare asyncio+AsyncOpenAI loop : {args.n / bare_after:8.1f} examples/s "
              f"({bare_after:.1f} s, after the stage)")
        bare_s = (bare_before + bare_after) / 2
        batches = summary["batches_submitted"]
        overhead = (stage_s * slots - summary["batch_seconds"]) / max(1, batches)
        print(f"rating stage (Prefect + Ray)  : {args.n / stage_s:8.1f} examples/s "
              f"({stage_s:.1f} s, {batches} batches)")
        print(f"stage / bare loop (mean)      : {bare_s / stage_s:8.2f} x")
        print(f"orchestration overhead        : {overhead:8.3f} s per batch "
              f"({summary['batch_seconds'] / max(1, batches):.2f} s inside a batch task per batch)")
        print(f"ideal (latency-bound)         : {args.concurrency / args.delay:8.1f} examples/s")
    finally:
        prefect_process.terminate()
        stub.terminate()
        for process in (prefect_process, stub):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
