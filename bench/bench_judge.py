"""Judge benchmark: pairs judged per second (both orders) through the shared LLM client against
a loopback OpenAI-compatible server that answers after a fixed latency (a stand-in for GPT-4's
network and queueing time; no real API is called). Shows how far concurrency hides latency.

The questions are real: the 80 Vicuna prompts (repeated to --pairs), with two synthetic answers.

    .venv/bin/python bench/bench_judge.py [--pairs 400] [--latency-ms 200] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VICUNA = ROOT.parent / "shared" / "data" / "eval_sets" / "vicuna_test_set.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    from gleaner.config import EndpointConfig
    from gleaner.tasks.evaluate.judge import Judge, Pair
    from gleaner.tasks.evaluate.verdicts import tally
    from tests.support.openai_server import OpenAIStub, Reply

    questions = [json.loads(line)["text"] for line in VICUNA.read_text().splitlines() if line]
    pairs = [Pair("vicuna", str(i), questions[i % len(questions)], f"long answer {i} " * 20,
                  f"short answer {i}") for i in range(args.pairs)]

    def responder(body: dict) -> Reply:
        return Reply("8 6\nThe first answer is more detailed.", delay_s=args.latency_ms / 1000)

    with OpenAIStub(responder) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="gpt-4",
                                  concurrency=args.concurrency, max_retries=2)
        started = time.perf_counter()
        results = Judge(endpoint).judge(pairs, "alpagasus")
        seconds = time.perf_counter() - started
        requests = stub.count()
    counts = tally(r.verdict for r in results)
    print(f"{args.pairs} pairs ({requests} judge calls) in {seconds:.2f} s: "
          f"{args.pairs / seconds:.1f} pairs/s, {requests / seconds:.1f} calls/s "
          f"at concurrency {args.concurrency}, {args.latency_ms:.0f} ms per call")
    print(f"W/T/L/failed: {counts.win}/{counts.tie}/{counts.lose}/{counts.failed} "
          f"(a judge that always says '8 6' is pure position bias: all ties)")
    ideal = 2 * args.pairs * args.latency_ms / 1000 / args.concurrency
    print(f"latency-bound ideal: {ideal:.2f} s")


if __name__ == "__main__":
    main()
