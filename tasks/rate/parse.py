"""Reading a rating off an answer: the first-line number, or none (never a zero)."""

from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)")
SCORE_MIN, SCORE_MAX = 0.0, 5.0


@dataclass(frozen=True)
class ParsedScore:
    score: float | None
    reason: str | None = None  # why there is no score

    @property
    def ok(self) -> bool:
        return self.score is not None


def parse_score(text: str | None) -> ParsedScore:
    """The score on the first line that has a number ("4.5", "Score: 4", "4/5", "**4**").

    Outside 0–5 or no number at all is a parse failure, never a zero.
    """
    if not text or not text.strip():
        return ParsedScore(None, "empty answer")
    for line in text.splitlines():
        match = NUMBER.search(line.replace("*", " "))
        if match is None:
            continue
        value = float(match.group(1))
        if not SCORE_MIN <= value <= SCORE_MAX:
            return ParsedScore(None, f"score {match.group(1)} outside {SCORE_MIN:g}-{SCORE_MAX:g}")
        return ParsedScore(value)
    first = text.strip().splitlines()[0][:80]
    return ParsedScore(None, f"no number in the answer (first line: {first!r})")
