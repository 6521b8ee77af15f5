"""Benchmark: quota use and 429 share per LLM stage, against a server that enforces a quota.

The endpoint is tests/support/quota_server.py in a process of its own: an
OpenAI-compatible server admitting ``--rate`` requests (40) per rolling 1-second
window, answering 429 with Retry-After beyond it, 50 ms per admitted answer. Each
LLM stage runs as its real flow (Prefect API + Ray, started here like the tests do,
batches as Prefect tasks on Ray, the stages' default batch sizes and concurrency)
told ``rpm = 60 * rate`` (2400), cache off:

- rating ``--rate-rows`` examples (4,000: one request each),
- DEITA scoring through the endpoint, ``--score-rows`` examples (2,000: complexity and
  quality, two requests each),
- judging ``--judge-pairs`` answer pairs (1,030: both orders, two requests each).

Printed per stage: requests, 429s and their share; quota use (admitted requests/s
over the quota) over the request window (first to last batch request, the probe
left out) and over the stage's whole time (run_stage: plan, probe, batches,
summary; the probe counted); the flow call's time. Prefect server and Ray start-up
(and a small warm-up flow that starts Ray's worker processes) are timed and stated
separately. The goal (the issue): >= 95 % of the quota used, <= 2 % answered 429.

    .venv/bin/python bench/bench_quota.py [--rate 40] [--stages rate,score,judge]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_USE, GOAL_429 = 0.95, 0.02


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Runs on demand only (not part of the test suite); needs no network.")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="requests/s the server admits per rolling second (40)")
    parser.add_argument("--rpm", type=int, default=None,
                        help="what the stages are told (default: 60 * rate); 0: no limiter")
    parser.add_argument("--stages", default="rate,score,judge",
                        help="comma-separated, of rate, score, judge")
    parser.add_argument("--rate-rows", type=int, default=4000)
    parser.add_argument("--score-rows", type=int, default=2000)
    parser.add_argument("--judge-pairs", type=int, default=1030)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch (default: each stage's own default)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight per batch (default: each stage's own, 16)")
    parser.add_argument("--task-cpus", type=float, default=None,
                        help="Ray CPUs per batch task (default: the stage's, 1)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--mode", choices=("sliding", "bucket"), default="sliding",
                        help="the server's quota: rolling window (default) or token bucket")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="let the first stage start Ray's worker processes itself")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    rpm = int(60 * args.rate) if args.rpm is None else (args.rpm or None)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    home = Path(tempfile.mkdtemp(prefix="bench-quota-"))
    os.environ.setdefault("GLEANER_HOME", str(home / "gleaner-home"))

    import ray

    from gleaner.config import GleanerConfig
    from gleaner.engine.stage import resolve_resources
    from gleaner.llm.ratelimit import ensure_rate_limiter, limiter_name
    from gleaner.runtime import init_ray, prefect_api, start_prefect_server
    from gleaner.tasks.deita.stages import EndpointScoreStage
    from gleaner.tasks.evaluate.stage import JudgeStage
    from gleaner.tasks.rate.stage import RateStage
    from tests.support.quota_server import STAGES, QuotaServer, run_stage_against

    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    rows = {"rate": args.rate_rows, "score": args.score_rows, "judge": args.judge_pairs}
    print(f"quota server: {args.rate:g} requests per rolling second ({args.mode}), "
          f"{args.latency * 1000:.0f} ms per answer, 429 + Retry-After beyond; stages told "
          f"rpm={rpm}; Ray CPUs {args.ray_cpus}; os.cpu_count()={os.cpu_count()}, load "
          f"average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    started = time.monotonic()
    prefect_process, api_url = start_prefect_server(home=home / "prefect",
                                                    log_path=home / "prefect.log")
    prefect_s = time.monotonic() - started
    results = []
    try:
        with prefect_api(api_url):
            config = GleanerConfig()
            config.ray.num_cpus = args.ray_cpus
            t = time.monotonic()
            init_ray(config)
            ray_s = time.monotonic() - t
            warm_s = 0.0
            if not args.no_warm_up:  # Ray's worker processes start (and import) once
                t = time.monotonic()
                with QuotaServer(rate=10_000, latency_s=0.0) as server:
                    run_stage_against("rate", server, str(home / "warm"), "warm-up", 20,
                                      rpm=None, batch_size=10, concurrency=4)
                warm_s = time.monotonic() - t
            print(f"start-up (not in the figures below): Prefect server {prefect_s:.1f} s, "
                  f"Ray {ray_s:.1f} s, warm-up flow {warm_s:.1f} s")
            for stage in stages:
                overrides = {}
                prefix = {"rate": "rate.resources", "score": "score.resources",
                          "judge": "evaluate.resources"}[stage]
                if args.task_cpus:
                    overrides[f"{prefix}.cpus"] = args.task_cpus
                defaults = resolve_resources(*{
                    "rate": (RateStage.declared, config.rate.resources),
                    "score": (EndpointScoreStage.declared, config.score.resources),
                    "judge": (JudgeStage.declared, config.evaluate.resources)}[stage])
                batch_size = args.batch_size or defaults.batch_size
                concurrency = args.concurrency or defaults.concurrency
                with QuotaServer(rate=args.rate, latency_s=args.latency,
                                 mode=args.mode) as server:
                    # the stage finds this bucket actor (one per endpoint+model) and uses it;
                    # held here, it outlives the stage, and says how many slots were taken
                    bucket = ensure_rate_limiter(limiter_name(server.base_url, "quota-model"),
                                                 rpm, None) if rpm else None
                    run = run_stage_against(stage, server, str(home / "store"), f"bench-{stage}",
                                            rows[stage], rpm=rpm, batch_size=batch_size,
                                            concurrency=concurrency,
                                            workdir=str(home / f"answers-{stage}"), **overrides)
                    window = server.stats()
                    whole = server.stats(include_probes=True, since=run.started,
                                         until=run.ended)
                    counts = ray.get(bucket.counts.remote()) if bucket else None
                    if bucket is not None:
                        ray.kill(bucket)
                summary = run.summary
                stage_use = whole.use_over(run.stage_seconds)
                flow_use = whole.use_over(run.flow_seconds)
                results.append((stage, whole, window, stage_use, flow_use))
                print(f"\n{stage}: {rows[stage]} rows, batches of {batch_size} x "
                      f"{concurrency} in flight, {summary.get('batches')} batches, "
                      f"{summary.get('failed')} rows failed")
                print(f"  requests {whole.requests} ({whole.by_route}), answered 429 "
                      f"{whole.rejected} = {whole.share_429:.2%}; engine counted "
                      f"{summary.get('requests')} requests")
                print(f"  request window {window.window_s:.1f} s: {window.admitted_per_s:.2f} "
                      f"admitted/s = {window.use:.1%} of the quota; peak offered "
                      f"{window.peak_offered} in 1 s; {window.idle_s:.1f} s with nothing sent "
                      f"(gaps over {2000 / args.rate:.0f} ms)")
                if counts is not None:
                    sent = window.requests  # the probe does not go through the limiter
                    reserved, shared = counts["reserved"], counts["shared"]
                    print(f"  limiter: {shared} requests sent on the workers' shares while "
                          f"the bucket's actor started, then {reserved} slots reserved for "
                          f"{sent - shared}: {reserved + shared - sent} given up by callers "
                          "that woke too late")
                print(f"  stage time {run.stage_seconds:.1f} s (plan, probe, batches, summary): "
                      f"{stage_use:.1%} of the quota; flow call {run.flow_seconds:.1f} s: "
                      f"{flow_use:.1%}")
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        prefect_process.terminate()
        with contextlib.suppress(Exception):
            prefect_process.wait(timeout=20)

    print(f"\n| stage | requests | 429 | 429 share | use, request window | use, stage time | "
          f"use, flow call | goal (>= {GOAL_USE:.0%} use over the stage, <= {GOAL_429:.0%} "
          f"429) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for stage, whole, window, stage_use, flow_use in results:
        met = stage_use >= GOAL_USE and whole.share_429 <= GOAL_429
        print(f"| {stage} | {whole.requests} | {whole.rejected} | {whole.share_429:.2%} | "
              f"{window.use:.1%} | {stage_use:.1%} | {flow_use:.1%} | "
              f"{'met' if met else 'not met'} |")
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
