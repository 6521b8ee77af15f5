"""Benchmark: the cost plan of the AlpaGasus sample, and what the Batch API path costs in time.

1. The plan (``gleaner plan``'s code) for the 9,229-example Alpaca sample
   (../shared/data/alpaca/alpaca_random_9k.json): rating with gpt-4o-mini (explain,
   the paper's mode) and judging the four AlpaGasus test sets (Koala, Vicuna, WizardLM,
   Self-Instruct; both orders) with gpt-4o, synchronous vs Batch API, at the config's
   default prices. Completion tokens are planned at max_tokens when nothing is recorded
   (an upper bound); the line after it prices the issue's typical answer lengths instead
   (≈60 tokens for a rating, ≈250 for a review).
2. The Batch API path's own overhead against the loopback Batch API server
   (tests/support/batch_server.py, answering at once): the rating stage run end to end
   (``rate_flow``: Prefect flow, the engine, replay, JSONL files, upload, create, poll,
   download, parts) on the sample, and the same run on the synchronous path against
   the same server, per 10k requests; then the driver's steps timed one by one
   (recording the requests, writing the input files, upload + create, reading back,
   replaying the answers into rows).

    .venv/bin/python bench/bench_cost.py [--poll 0.5] [--skip-runs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gleaner.config import GleanerConfig  # noqa: E402
from gleaner.engine.summary import estimate_cost  # noqa: E402
from gleaner.store import Store  # noqa: E402
from gleaner.tasks.cost.plan import plan_sources  # noqa: E402
from gleaner.tasks.cost.report import plan_text  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"
EVAL_SETS = ROOT.parent / "shared" / "data" / "eval_sets"
TYPICAL_COMPLETION = {"rate": 60, "judge": 250}


def plan_figures(store: str) -> None:
    config = GleanerConfig().with_overrides({
        "store.url": store, "curate.train": False,
        "rate.endpoint": {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini"},
        "rate.mode": "explain",
        "evaluate.endpoint": {"base_url": "https://api.openai.com/v1", "model": "gpt-4o"},
        "evaluate.test_sets": ["koala", "vicuna", "wizardlm", "sinstruct"],
        "evaluate.test_sets_dir": str(EVAL_SETS)})
    started = time.perf_counter()
    plan = plan_sources([str(ALPACA)], config, "bench")
    seconds = time.perf_counter() - started
    print("== 1. the cost plan (upper bound on completion tokens)")
    print(plan_text(plan))
    print(f"(planned in {seconds:.1f} s)")
    sync = batch = 0.0
    for stage in plan["stages"]:
        kind = "judge" if "/judge/" in stage["stage"] else "rate"
        completion = TYPICAL_COMPLETION[kind] * stage["requests"]
        price = config.prices[stage["model"]]
        sync += estimate_cost(price, stage["prompt_tokens"], completion) or 0.0
        batch += estimate_cost(price, stage["prompt_tokens"], completion,
                               stage["prompt_tokens"], completion) or 0.0
    print(f"with typical answers (rating {TYPICAL_COMPLETION['rate']}, review "
          f"{TYPICAL_COMPLETION['judge']} completion tokens): synchronous ${sync:,.2f}, "
          f"Batch API ${batch:,.2f}")


def rater(body: dict) -> object:
    from tests.support.openai_server import Reply, request_text

    text = request_text(body)
    return Reply(f"{len(text) % 11 / 2:g}\nThe response follows the instruction.")


def run_figures(poll_s: float) -> None:
    from gleaner.flows.rate_flow import rate_flow
    from gleaner.runtime import execution_environment
    from gleaner.tasks.ingest.ingest import run_ingest
    from tests.support.batch_server import BatchServer

    print("\n== 2. the Batch API path's overhead (loopback server answering at once)")
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as folder, \
            BatchServer(rater, complete_after_s=0.0) as server:
        store = Store(str(Path(folder) / "store"))
        base = GleanerConfig().with_overrides({
            "store.url": store.url, "rate.endpoint.base_url": server.base_url,
            "rate.endpoint.model": "gpt-4o-mini", "rate.endpoint.max_retries": 0,
            "rate.mode": "explain", "rate.cache": False, "rate.resources.batch_size": 512,
            "rate.resources.concurrency": 64, "batch_api.poll_interval_s": poll_s})
        with execution_environment(base) as _:
            figures = {}
            for api in ("chat", "batch"):
                run_id = f"bench-{api}"
                run_ingest([str(ALPACA)], store, run_id, base)
                config = base.with_overrides({"rate.endpoint.api": api})
                started = time.perf_counter()
                summary = rate_flow(run_id=run_id, config=config)
                figures[api] = (time.perf_counter() - started, summary["requests"],
                                summary.get("batch_api"))
        for api, (seconds, requests, usage) in figures.items():
            per_10k = seconds / requests * 10_000
            extra = (f"; {usage['batches']} batches, {usage['rounds']} rounds"
                     if usage else "")
            print(f"  {api:5s}: {requests:,} requests in {seconds:.1f} s = "
                  f"{per_10k:.1f} s per 10k requests{extra}")
        steps(store, server)


def steps(store: Store, server: object) -> None:
    """The driver's steps one by one, on the sample's rating requests."""
    from gleaner.config import BatchAPIConfig
    from gleaner.engine.batch_state import (
        AnswerIndex,
        BatchState,
        collect,
        prepare,
        submit,
        update,
    )
    from gleaner.engine.replay import Pending, Policy, ReplayWorker
    from gleaner.llm.batches import BatchAPI
    from gleaner.tasks.rate.stage import RateStage

    config = GleanerConfig().with_overrides({
        "rate.endpoint.base_url": server.base_url, "rate.endpoint.model": "gpt-4o-mini",
        "rate.mode": "explain"})
    stage = RateStage(config.rate)
    rows = store.read_stage("bench-chat", "ingest", columns=list(stage.input_columns))
    timings: dict[str, float] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = call()
        timings[name] = time.perf_counter() - started
        return out

    def record() -> list:
        try:
            ReplayWorker(stage, lambda ids: ({}, {}), Policy()).process(rows)
        except Pending as pending:
            return pending.requests
        return []

    requests = timed("record the requests (the stage's worker, no answers)", record)
    state = BatchState("bench-steps", "rate")
    records = timed("write the JSONL input files", lambda: prepare(
        store, state, requests, BatchAPIConfig()))
    api = BatchAPI(stage.endpoint)
    timed("upload + create the batches",
          lambda: [submit(store, state, r, api, "24h") for r in records])
    for record_ in records:
        while record_.status != "completed":
            update(record_, api.retrieve(record_.batch_id))
    timed("download + read back the output", lambda: [collect(store, state, r, api)
                                                      for r in records])
    index = AnswerIndex(store, state)
    worker = ReplayWorker(stage, lambda ids: index.lookup(ids), Policy())
    table = timed("replay the answers into rows", lambda: worker.process(rows))
    api.close()
    total = sum(timings.values())
    print(f"  the driver's steps for {len(requests):,} requests ({table.num_rows:,} rows, "
          f"{sum(r.bytes for r in records) / 1e6:.1f} MB of JSONL):")
    for name, seconds in timings.items():
        print(f"    {name:55s} {seconds:6.2f} s")
    print(f"    {'total':55s} {total:6.2f} s = {total / len(requests) * 10_000:.1f} s per 10k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--poll", type=float, default=0.5, help="batch_api.poll_interval_s")
    parser.add_argument("--skip-runs", action="store_true", help="only the plan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as folder:
        plan_figures(str(Path(folder) / "store"))
    if not args.skip_runs:
        run_figures(args.poll)


if __name__ == "__main__":
    main()
