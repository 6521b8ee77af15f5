"""Reading the rank-and-score answer: one ``[k] Score: n`` per version (case-insensitive).

Accepted: ``[3] Score: 4``, ``[Response 3] Score: 4``, ``[3] score:4`` anywhere in the
answer, in any order, with text around them. A failure (not a zero, not a guess) when a
version has no score, has two different ones, a line names a version that does not exist,
or a score is not a whole number in 1..n+1; the raw answer is kept with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCORE_LINE = re.compile(r"\[\s*(?:response\s*)?(\d+)\s*\]\s*score\s*:?\s*(\d+(?:\.\d+)?)",
                         re.IGNORECASE)


@dataclass(frozen=True)
class Parsed:
    scores: list[int] | None
    reason: str | None = None


def parse_scores(text: str, n: int) -> Parsed:
    """The scores of versions 1..n, or why there are none."""
    found: dict[int, int] = {}
    for index_text, value_text in _SCORE_LINE.findall(text or ""):
        index, value = int(index_text), float(value_text)
        if not 1 <= index <= n:
            return Parsed(None, f"a score for version [{index}], but there are {n} versions")
        if value != int(value) or not 1 <= value <= n + 1:
            return Parsed(None, f"version [{index}] has score {value_text}, not a whole "
                                f"number in 1-{n + 1}")
        if index in found and found[index] != int(value):
            return Parsed(None, f"version [{index}] has two scores ({found[index]}, "
                                f"{int(value)})")
        found[index] = int(value)
    missing = [k for k in range(1, n + 1) if k not in found]
    if missing:
        return Parsed(None, f"no '[k] Score: n' for version(s) {missing}" if found
                      else "no '[k] Score: n' line in the answer")
    return Parsed([found[k] for k in range(1, n + 1)])
