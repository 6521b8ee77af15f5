"""Benchmark: llama.cpp prompt evaluation of SmolLM2-135M, shipped Q4_1 vs requantised Q4_0.

Why: the offline rater spends its time evaluating ~200-token rating prompts;
gleaner requantises the shipped Q4_1 GGUF to Q4_0 once (faster CPU kernels)
and picks the server's thread count. This prints prompt tokens/s for each
file and thread count (logits_all on, as the server runs it for logprobs),
alternating rounds so background load hits all variants alike.

    .venv/bin/python bench/bench_llama_quant.py [--rounds 3] [--tokens 220]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gleaner.llm import llama_build  # noqa: E402
from gleaner.llm.local_server import requantize_q4_0  # noqa: E402
from gleaner.models import smollm2_gguf  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=220)
    args = parser.parse_args()

    choice = llama_build.choose()  # the CPU variant proven on this machine, as the server runs
    if choice.path:
        llama_build.load_variant(choice.path)
    import llama_cpp

    source = smollm2_gguf()
    q4_0 = requantize_q4_0(source, variant=choice.path)
    thread_counts = sorted({1, os.cpu_count() or 1})
    models = {}
    for name, path in (("Q4_1 (shipped)", source), ("Q4_0 (requantised)", q4_0)):
        for threads in thread_counts:
            models[(name, threads)] = llama_cpp.Llama(
                str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False,
            )
    text = ALPACA.read_text(encoding="utf-8")[:4000]
    tokens = next(iter(models.values())).tokenize(text.encode())[: args.tokens]
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            model.reset()
            started = time.perf_counter()
            model.eval(tokens)
            rates[key].append(len(tokens) / (time.perf_counter() - started))
    print(f"llama.cpp CPU code: {llama_build.describe(choice)}")
    print(f"prompt evaluation, {len(tokens)} tokens, {args.rounds} rounds, "
          f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    for (name, threads), values in rates.items():
        values.sort()
        print(f"{name:20s} {threads} thread(s): median {values[len(values) // 2]:7.1f} "
              f"best {values[-1]:7.1f} tokens/s")


if __name__ == "__main__":
    main()
