"""A cluster-wide requests/min + tokens/min limit: one named Ray actor is the token bucket.

An API quota belongs to the account, not to a process: eight Ray workers
each limiting themselves to the quota would send eight times too much. So
every worker on every node asks the same named actor
(``get_if_exists=True``) for a reservation; the actor answers how long the
caller must wait, and the caller sleeps locally, so the actor is never
blocked and serves thousands of callers.

The flow creates the actor (its lifetime is the flow's: it is owned by the
flow's driver process) and hands its name to the tasks.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

NAMESPACE = "gleaner"


class TokenBucket:
    """Two buckets (requests, tokens) refilled continuously; reservations may go into debt.

    ``reserve`` always grants and returns the wait: a caller that takes more than
    is available pushes the level below zero and waits until the refill pays the
    debt back, so callers are served in arrival order and a request bigger than
    the burst (a long prompt) still gets through.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        burst_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._clock = clock
        self.burst_s = burst_s
        self.configure(rpm, tpm)

    def configure(self, rpm: float | None, tpm: float | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._rate_r = rpm / 60.0 if rpm else None  # per second
        self._rate_t = tpm / 60.0 if tpm else None
        self._cap_r = max(1.0, self._rate_r * self.burst_s) if self._rate_r else 0.0
        self._cap_t = max(1.0, self._rate_t * self.burst_s) if self._rate_t else 0.0
        self._level_r, self._level_t = self._cap_r, self._cap_t
        self._last = self._clock()

    def reserve(self, requests: int = 1, tokens: int = 0) -> float:
        """Take ``requests`` and ``tokens`` now; return the seconds the caller must wait first."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        wait = 0.0
        if self._rate_r:
            self._level_r = min(self._cap_r, self._level_r + elapsed * self._rate_r) - requests
            wait = max(wait, -self._level_r / self._rate_r)
        if self._rate_t:
            self._level_t = min(self._cap_t, self._level_t + elapsed * self._rate_t) - tokens
            wait = max(wait, -self._level_t / self._rate_t)
        return max(0.0, wait)


class LocalRateLimiter:
    """The same bucket inside one process: for single-process use (a script, a judge run)."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float = 1.0):
        self.bucket = TokenBucket(rpm, tpm, burst_s)

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        wait = self.bucket.reserve(requests, tokens)
        if wait > 0:
            await asyncio.sleep(wait)


class _BucketActor:
    """The Ray actor holding the one bucket of an endpoint+model (made remote lazily)."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float = 1.0):
        self.bucket = TokenBucket(rpm, tpm, burst_s)

    def configure(self, rpm: float | None, tpm: float | None) -> None:
        if (rpm, tpm) != (self.bucket.rpm, self.bucket.tpm):
            self.bucket.configure(rpm, tpm)

    def reserve(self, requests: int = 1, tokens: int = 0) -> float:
        return self.bucket.reserve(requests, tokens)

    def limits(self) -> tuple[float | None, float | None]:
        return self.bucket.rpm, self.bucket.tpm


def limiter_name(base_url: str, model: str) -> str:
    """One bucket per endpoint and model: that is how providers count quotas."""
    digest = hashlib.sha256(f"{base_url}|{model}".encode()).hexdigest()[:12]
    return f"gleaner-ratelimit-{digest}"


def ensure_rate_limiter(
    name: str, rpm: float | None, tpm: float | None, burst_s: float = 1.0
) -> Any:
    """Create (or find) the named bucket actor; call from the flow so the flow owns it."""
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=-1)(_BucketActor)
    handle = actor_class.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
        rpm, tpm, burst_s
    )
    ray.get(handle.configure.remote(rpm, tpm))
    return handle


class RayRateLimiter:
    """What a worker holds: the name of the cluster-wide bucket, resolved on first use."""

    def __init__(self, name: str, namespace: str = NAMESPACE):
        self.name = name
        self.namespace = namespace
        self._handle: Any = None

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        wait = await self._handle.reserve.remote(requests, tokens)
        if wait > 0:
            await asyncio.sleep(wait)
