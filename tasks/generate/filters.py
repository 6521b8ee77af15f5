"""Alpaca's filters of a parsed task, in Alpaca's order, each a named reason.

From stanford_alpaca's ``post_process_gpt3_response``: an instruction of <= 3 or > 150 words
(split on whitespace); one containing a blacklisted word as a word (case-insensitive:
things a language model cannot see or make); one starting with "Write a program"; one starting
with punctuation or with a non-ASCII character. gleaner adds ``empty_output`` (a task without a
response cannot be rated or trained on; Alpaca kept such tasks). The ROUGE-L near-duplicate
filter (:mod:`gleaner.tasks.generate.rouge`) runs after these.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from functools import lru_cache

ALPACA_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)
MIN_WORDS = 3  # rejected at or below
MAX_WORDS = 150  # rejected above
# Every reason a candidate can be dropped for, in the order they are checked.
PARSE_REASONS = ("length_cut", "malformed")
TASK_REASONS = ("too_short", "too_long", "blacklisted", "write_a_program",
                "starts_with_punctuation", "starts_non_ascii", "empty_output")
POOL_REASONS = ("near_duplicate", "duplicate")
REASONS = PARSE_REASONS + TASK_REASONS + POOL_REASONS


@lru_cache(maxsize=8)
def _blacklist_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # One alternation is the same test as Alpaca's any(\bword\b per word): backtracking tries
    # every alternative at every position.
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"\b({alternatives})\b", flags=re.IGNORECASE)


def blacklist(extra: Sequence[str] = ()) -> tuple[str, ...]:
    return ALPACA_BLACKLIST + tuple(w for w in extra if w and w not in ALPACA_BLACKLIST)


def filters_version(extra: Sequence[str] = ()) -> str:
    """Changes when the filters change (a resumed run must filter the same way)."""
    blob = "|".join([*blacklist(extra), str(MIN_WORDS), str(MAX_WORDS), "empty_output"])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def task_filter(instruction: str, output: str, extra_blacklist: Sequence[str] = ()
                ) -> str | None:
    """The first filter a parsed task fails, or None when it passes them all."""
    words = len(instruction.split())
    if words <= MIN_WORDS:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if _blacklist_pattern(blacklist(extra_blacklist)).search(instruction):
        return "blacklisted"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    if not output.strip():
        return "empty_output"
    return None
