"""Turning two judge orders into one verdict, and verdicts into W/T/L reports.

The judge sees every pair twice: once with the curated model (A) as Assistant 1
and once as Assistant 2, to cancel position bias (SPEC §6). Each order gives A
a win, tie or loss; a *rule* combines the two:

- ``alpagasus`` (the default, AlpaGasus' protocol): Win = two wins or a win and
  a tie; Tie = two ties or a win and a loss; Lose = two losses or a loss and a tie.
- ``fastchat`` (FastChat's MT-Bench pairwise rule): the orders must agree;
  any disagreement is a tie.

A pair whose judge answer could not be parsed (after retries) in either order
is a judge failure: it is counted apart and never folded into ties.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from gleaner.tasks.evaluate.length_control import LengthControlled, length_controlled

WIN, TIE, LOSE, FAILED = "win", "tie", "lose", "failed"
Outcome = Literal["win", "tie", "lose"]
Verdict = Literal["win", "tie", "lose", "failed"]
RULES = ("alpagasus", "fastchat")
OUTCOMES: tuple[Outcome, ...] = (WIN, TIE, LOSE)


def order_outcome(score_1: float, score_2: float, a_is_assistant: Literal[1, 2]) -> Outcome:
    """A's result in one order, from the judge's scores for Assistant 1 and Assistant 2."""
    a, b = (score_1, score_2) if a_is_assistant == 1 else (score_2, score_1)
    if a > b:
        return WIN
    if a < b:
        return LOSE
    return TIE


def combine(first: Outcome, second: Outcome, rule: str = "alpagasus") -> Outcome:
    """One verdict for A from its outcomes in the two orders (both already from A's side)."""
    if first not in OUTCOMES or second not in OUTCOMES:
        raise ValueError(f"outcomes must be win/tie/lose, got {first!r}, {second!r}")
    if rule == "alpagasus":
        points = {WIN: 1, TIE: 0, LOSE: -1}
        total = points[first] + points[second]
        return WIN if total > 0 else LOSE if total < 0 else TIE
    if rule == "fastchat":
        return first if first == second else TIE
    raise ValueError(f"unknown combination rule {rule!r}; choose one of {', '.join(RULES)}")


def verdict(first: Outcome | None, second: Outcome | None, rule: str = "alpagasus") -> Verdict:
    """Like :func:`combine`, but a missing order (judge failure) makes the pair a failure."""
    if first is None or second is None:
        return FAILED
    return combine(first, second, rule)


@dataclass
class Tally:
    """W/T/L of one test set (or of all of them), with judge failures and token cost."""

    win: int = 0
    tie: int = 0
    lose: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)
    # (verdict, len(A's answer), len(B's answer)) of each pair, for the length-controlled rate
    lengths: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, outcome: Verdict, length_a: int | None = None,
            length_b: int | None = None) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        if length_a is not None and length_b is not None:
            self.lengths.append((outcome, length_a, length_b))

    def length_controlled(self) -> LengthControlled:
        """The raw and the length-controlled win rate (AlpacaEval 2's) of the pairs."""
        verdicts, a, b = zip(*self.lengths, strict=True) if self.lengths else ((), (), ())
        return length_controlled(list(verdicts), list(a), list(b))

    @property
    def judged(self) -> int:
        return self.win + self.tie + self.lose

    @property
    def winning_score(self) -> float | None:
        """AlpaGasus' (W - L) / N + 1 over the judged pairs: 1.0 means level, 2.0 all wins."""
        if self.judged == 0:
            return None
        return (self.win - self.lose) / self.judged + 1

    def merge(self, other: Tally) -> None:
        for name in ("win", "tie", "lose", "failed", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd += other.cost_usd
        for key, value in other.extra.items():
            self.extra[key] = self.extra.get(key, 0) + value
        self.lengths += other.lengths

    def as_dict(self) -> dict[str, object]:
        score = self.winning_score
        return {
            "win": self.win,
            "tie": self.tie,
            "lose": self.lose,
            "failed": self.failed,
            "judged": self.judged,
            "winning_score": None if score is None else round(score, 4),
            **self.length_controlled().as_dict(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            **self.extra,
        }


def tally(verdicts: Iterable[Verdict]) -> Tally:
    result = Tally()
    for outcome in verdicts:
        result.add(outcome)
    return result


def overall(per_set: Mapping[str, Tally]) -> Tally:
    total = Tally()
    for part in per_set.values():
        total.merge(part)
    return total


def markdown_table(per_set: Mapping[str, Tally], model_a: str, model_b: str, rule: str) -> str:
    """The W/T/L table a person reads: one row per test set and the overall row."""
    lines = [
        f"### {model_a} vs {model_b} (rule: {rule})",
        "",
        "| test set | win | tie | lose | judge failures | winning score | win rate "
        "| LC win rate | judge tokens | cost (USD) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(per_set.items()) + [("**overall**", overall(per_set))]
    for name, part in rows:
        score, rates = part.winning_score, part.length_controlled()
        lines.append(
            f"| {name} | {part.win} | {part.tie} | {part.lose} | {part.failed} | "
            f"{'n/a' if score is None else f'{score:.3f}'} | {percent(rates.win_rate)} | "
            f"{percent(rates.lc_win_rate)} | "
            f"{part.prompt_tokens + part.completion_tokens} | {part.cost_usd:.4f} |"
        )
    lines += ["", "Win rate: (W + T/2) / N. LC win rate: the judge's preference at equal answer "
              "lengths (AlpacaEval 2's length-controlled win rate; docs/methods.md)."]
    return "\n".join(lines) + "\n"


def percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f} %"


def stacked_bar_png(per_set: Mapping[str, Tally], model_a: str, model_b: str) -> bytes:
    """AlpaGasus-style stacked bars (win / tie / lose share per test set) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_set)
    totals = [max(per_set[n].judged, 1) for n in names]
    shares = {k: [getattr(per_set[n], k) / t for n, t in zip(names, totals, strict=True)]
              for k in OUTCOMES}
    colours = {WIN: "#4c9a2a", TIE: "#c9c9c9", LOSE: "#c0392b"}
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6))
    left = [0.0] * len(names)
    for kind in OUTCOMES:
        ax.barh(names, shares[kind], left=left, color=colours[kind], label=kind)
        for i, (start, width) in enumerate(zip(left, shares[kind], strict=True)):
            count = getattr(per_set[names[i]], kind)
            if width > 0.06:
                ax.text(start + width / 2, i, str(count), ha="center", va="center", fontsize=9)
        left = [a + b for a, b in zip(left, shares[kind], strict=True)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of judged pairs")
    ax.set_title(f"{model_a} vs {model_b}")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
