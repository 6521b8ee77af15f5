"""LC vs raw win rate on real answer pairs: Alpaca-GPT4 (A) against Alpaca's text-davinci-003
(B) on the instructions the two samples share, judged by three stand-in judges.

No real GPT-4 review is on this machine (and no test replays one), so the verdicts come from
judges whose preference is known, applied to the real lengths of real answers: one that
prefers the longer answer (pure length bias), one that prefers GPT-4's answer whatever its
length (pure quality), and one that mixes both. The length-controlled rate should fall to
about 50 % for the first, stay at the raw rate for the second and land between for the third.

    .venv/bin/python bench/bench_length_control.py [--draws 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def shared_pairs() -> list[tuple[str, str]]:
    """(GPT-4's answer, text-davinci-003's answer) for every instruction + input both hold."""
    def key(r: dict) -> tuple[str, str]:
        return r["instruction"].strip(), r.get("input", "").strip()

    davinci = {key(r): r["output"] for r in
               json.loads((DATA / "alpaca" / "alpaca_random_9k.json").read_text())}
    gpt4 = json.loads((DATA / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json").read_text())
    return [(r["output"], davinci[key(r)]) for r in gpt4 if key(r) in davinci]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="verdict draws per judge")
    args = parser.parse_args()
    from gleaner.tasks.evaluate.length_control import length_controlled

    pairs = shared_pairs()
    rng = np.random.default_rng(0)
    a = np.array([len(x) for x, _ in pairs])
    b = np.array([len(y) for _, y in pairs])
    d = a - b
    x = np.tanh(d / d.std())

    def verdicts(p_a: np.ndarray) -> list[str]:
        return ["win" if r < p else "lose" for r, p in zip(rng.random(len(p_a)), p_a,
                                                          strict=True)]

    judges = {
        "length only (prefers the longer answer)": 1 / (1 + np.exp(-4 * x)),
        "quality only (prefers GPT-4's 75 % of the time)": np.full(len(pairs), 0.75),
        "both (quality 65 %, plus length)": 1 / (1 + np.exp(-(np.log(0.65 / 0.35) + 2 * x))),
    }
    print(f"{len(pairs)} shared instructions; GPT-4's answer is longer in "
          f"{np.mean(d > 0):.0%} of them (median {np.median(a):.0f} vs {np.median(b):.0f} "
          "characters)")
    print(f"{'judge (mean over draws; 5-95 % of draws)':52} {'raw':>18} {'LC':>18}")
    for name, p_a in judges.items():
        runs = [length_controlled(verdicts(p_a), a, b) for _ in range(args.draws)]
        raw = np.array([r.win_rate for r in runs])
        lc = np.array([r.lc_win_rate for r in runs])
        print(f"{name:52} {spread(raw):>18} {spread(lc):>18}")


def spread(values: np.ndarray) -> str:
    low, high = np.percentile(values, [5, 95])
    return f"{values.mean():.1%} ({low:.0%}-{high:.0%})"


if __name__ == "__main__":
    main()
