"""Fault-injecting responders for :class:`tests.support.openai_server.OpenAIStub`.

A :class:`FaultyRater` answers rating requests like a real rater would (a
score on the first line, or one token with top_logprobs in score-only mode)
and, at chosen rates, injects what real endpoints do: 429 with Retry-After,
500, a hang beyond the client timeout, an unparseable answer and a broken
JSON body. It counts requests and successful ratings per example, so tests
can check that nothing is lost and nothing is rated twice.

Examples are recognised by a tag in their instruction: ``[ex:<key>]``.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.openai_server import Reply, request_text

TAG = re.compile(r"\[ex:([A-Za-z0-9_-]+)\]")
FAULT_KINDS = ("429", "500", "hang", "unparseable", "broken_json")


def tag(key: str | int) -> str:
    return f"[ex:{key}]"


def example_key(body: dict[str, Any]) -> str | None:
    match = TAG.search(request_text(body))
    return match.group(1) if match else None


def stable_score(key: str) -> float:
    """A deterministic 'true' score per example: 0, 0.5, ..., 5.0."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 11 / 2


def score_only_logprobs(score: float) -> list[dict[str, float]]:
    """One position whose expected value over "0".."5" equals ``score`` (two neighbours mixed)."""
    low = math.floor(score)
    high = min(5, low + 1)
    share_high = score - low
    top: dict[str, float] = {"The": math.log(0.2)}
    if share_high <= 0 or high == low:
        top[str(low)] = math.log(0.8)
    else:
        top[str(low)] = math.log(0.8 * (1 - share_high))
        top[f" {high}"] = math.log(0.8 * share_high)  # leading space, as real tokenizers emit
    return [dict(sorted(top.items(), key=lambda kv: -kv[1]))]


@dataclass
class FaultyRater:
    """The responder: ``OpenAIStub(FaultyRater(rates={"429": 0.05, ...}))``."""

    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    retry_after_s: float = 0.05
    hang_s: float = 1.5
    delay_s: float = 0.0
    logprobs: bool = True  # answer score-only requests with top_logprobs
    # keys whose every request fails with this status (an endpoint down for them)
    down: Callable[[str, int], int | None] | None = None
    score_of: Callable[[str], float] = stable_score
    requests: Counter[str] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def keys_requested(self) -> set[str]:
        with self._lock:
            return set(self.requests)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.requests)

    def _pick_fault(self) -> str | None:
        draw = self._rng.random()
        for kind in FAULT_KINDS:
            draw -= self.rates.get(kind, 0.0)
            if draw < 0:
                return kind
        return None

    def __call__(self, body: dict[str, Any]) -> Reply:
        key = example_key(body) or "untagged"
        with self._lock:
            self.requests[key] += 1
            count = self.requests[key]
            status = self.down(key, count) if self.down else None
            fault = None if status else self._pick_fault()
            if status:
                self.faults[str(status)] += 1
            elif fault:
                self.faults[fault] += 1
            else:
                self.successes[key] += 1
        if status:
            return Reply(status=status, delay_s=self.delay_s)
        if fault == "429":
            return Reply(status=429, headers={"Retry-After": f"{self.retry_after_s}"})
        if fault == "500":
            return Reply(status=500)
        if fault == "hang":
            # answers only after the client gave up, and with an error, so never a success
            return Reply(status=503, delay_s=self.hang_s)
        if fault == "unparseable":
            return Reply(content="This response is fairly good but could be more detailed.")
        if fault == "broken_json":
            return Reply(raw_body='{"id": "broken", "choices": [{"index": 0, "message": {')
        score = self.score_of(key)
        if self.logprobs and body.get("logprobs") and body.get("max_tokens") == 1:
            top = score_only_logprobs(score)
            return Reply(content=next(iter(top[0])), top_logprobs=top, delay_s=self.delay_s)
        text = f"{score:g}\nThe response answers the instruction; minor details missing."
        return Reply(content=text, delay_s=self.delay_s)


def examples(keys: Iterable[str | int], source: str = "test://rate") -> list[Any]:
    """Canonical examples whose instructions carry the stub's tag."""
    from gleaner.schema import Example

    return [
        Example(
            source=source,
            source_row=row,
            instruction=f"{tag(key)} Explain item {key} in one sentence.",
            output=f"Item {key} is an example used to test the rating stage.",
        )
        for row, key in enumerate(keys)
    ]
