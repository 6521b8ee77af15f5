"""A cluster-wide requests/min + tokens/min limit: one named Ray actor is the token bucket.

An API quota belongs to the account, not to a process: eight Ray workers
each limiting themselves to the quota would send eight times too much. So
every worker on every node asks the same named actor
(``get_if_exists=True``) for a slot; the actor grants slots a little ahead
of their moment (:data:`LEAD_S`), answering how long the caller must wait and
when it reckoned so, and the caller sleeps locally, so the actor never sleeps
for anyone and serves thousands of callers. Slots are spaced evenly a little
under the told rate (see BURST_S, HEADROOM, LATE_S).

Slots go to the earliest batch first (the caller's ``priority``, the batch
index; arrival order among equals). A stage runs several batches at once; shared
fairly, they would all end together, and the quota would lie idle while every
slot of the cluster turns over to its next batch (a Prefect task run, the rows
read, a client opened: tenths of a second each time). Served earliest first, one
batch takes what it can use and the next one already waits with its requests
when it ends; a batch that cannot use the whole quota (a slow model) leaves the
rest to the next, so no slot is ever left unused for priority's sake.

The flow creates the actor (its lifetime is the flow's: it is owned by the
flow's driver process) and hands its name to the tasks. A worker that finds it
gone (its owner ended: another driver that shared the endpoint's quota, or the
previous stage, whose actor was still dying when this one found it by name)
makes it again.

A new actor needs a Ray process of its own: a second or two before it answers.
Meanwhile each of the S workers (the stage's batches running at once) paces
itself at its share of the requests limit, and when the actor answers every
worker goes over to it. The shares are uncoordinated, so each leaves room for
one request of phase (a share of r requests/s can put r + 1 in a second): each
paces at (rpm/S - 60)/min, which keeps their sum within the limit in every
second; and the actor's first slot comes S + 1 slots after its first request,
so a second straddling the handover holds no more than the limit either (the
workers' last S requests, one each, are paid back). See :func:`share_limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

NAMESPACE = "gleaner"

# Providers count a quota over a rolling window (often shorter than the minute they
# quote), not as a bucket that lends a second of burst. A limiter that lets an idle
# bucket burst ``rate * burst_s`` and then refills at the full rate sends up to
# ``rate * (1 + burst_s)`` within one window: the excess is answered 429 (and those
# retries take slots again). So the limiters save up no burst (one request at most:
# requests go out evenly spaced) and pace a little under the told limit, so the
# spacing survives the jitter between the reservation and the request's arrival
# (the reply from the actor, the event loop, a loaded host): with 1.5 %, N requests
# span N / (0.985 N/s) = 1.015 s, 15 ms of jitter before a 1-second window overflows.
BURST_S = 0.0
HEADROOM = 0.015
# A caller that wakes up later than this after its slot (its process was stalled: the
# host's scheduler, the GIL, a collection) gives the slot up and takes a new one: sent
# late, it would arrive less than one window before the request N slots after it (a
# 429 for that one), and stalls of 50-250 ms are what a loaded host has. A slot given
# up is a slot lost, no more than the 429 it avoids would cost (a rejected request
# takes a slot, its retry another). "Later" is beyond the caller's usual lateness
# (see _Pacer), and the slots given up are bounded besides:
LATE_S = 0.015  # HEADROOM's 15 ms: late sends that would mostly pass are sent
MAX_RESLOTS = 2  # new slots per request at most
# slots one limiter (one client: one batch) gives up at most: a stall of one process
# holds up to its concurrency's worth of slots at once
RESLOT_SHARE, RESLOT_FREE = 0.05, 32
# How far ahead of its moment a slot is granted: longer than the actor's reply takes to
# reach a caller on a loaded host (a few ms, tens at worst), so the caller still sleeps
# until the exact moment; short, so the earliest batch is chosen close to the slot.
LEAD_S = 0.1
# times a worker looks for (or makes) a bucket whose actor died under it, before it fails
FIND_TRIES = 4

# the priority of this context's requests (the engine sets the batch index; lower first)
_priority: contextvars.ContextVar[int] = contextvars.ContextVar("gleaner_rate_priority",
                                                                default=0)


@contextlib.contextmanager
def request_priority(priority: int) -> Iterator[None]:
    """Requests made inside (by any client, in any task started inside) get slots before
    those of a higher ``priority`` number: the engine passes a batch's index."""
    token = _priority.set(priority)
    try:
        yield
    finally:
        _priority.reset(token)


class TokenBucket:
    """Two buckets (requests, tokens) refilled continuously; reservations may go into debt.

    ``reserve`` always grants and returns the wait: a caller that takes more than
    is available pushes the level below zero and waits until the refill pays the
    debt back, so callers are served in arrival order and a request bigger than
    the burst (a long prompt) still gets through.

    ``burst_s`` is the credit an idle bucket saves up (in seconds of refill, at least
    one request / one token); ``headroom`` paces that share below the told limits.
    The plain bucket has neither (``headroom=0``); the limiters below use
    :data:`BURST_S` and :data:`HEADROOM`, which fit a provider's quota (see there).
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        burst_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        headroom: float = 0.0,
    ):
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), not {headroom}")
        self.clock = clock
        self.burst_s = burst_s
        self.headroom = headroom
        self.configure(rpm, tpm)

    def configure(self, rpm: float | None, tpm: float | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        pace = 1.0 - self.headroom
        self._rate_r = rpm / 60.0 * pace if rpm else None  # per second
        self._rate_t = tpm / 60.0 * pace if tpm else None
        self._cap_r = max(1.0, self._rate_r * self.burst_s) if self._rate_r else 0.0
        self._cap_t = max(1.0, self._rate_t * self.burst_s) if self._rate_t else 0.0
        self._level_r, self._level_t = self._cap_r, self._cap_t
        self._last = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self._rate_r:
            self._level_r = min(self._cap_r, self._level_r + elapsed * self._rate_r)
        if self._rate_t:
            self._level_t = min(self._cap_t, self._level_t + elapsed * self._rate_t)

    def _wait(self, requests: int, tokens: int) -> float:
        wait = 0.0
        if self._rate_r:
            wait = max(wait, (requests - self._level_r) / self._rate_r)
        if self._rate_t:
            wait = max(wait, (tokens - self._level_t) / self._rate_t)
        return max(0.0, wait)

    def avoidable_wait(self, requests: int = 1, tokens: int = 0) -> float:
        """How much longer than it ever must a reservation made now would wait; takes
        nothing. A request bigger than the burst (a long prompt under a tokens/min limit)
        always waits for its excess to refill: that part of its wait is not counted."""
        self._refill()
        least = 0.0
        if self._rate_r:
            least = max(least, (requests - self._cap_r) / self._rate_r)
        if self._rate_t:
            least = max(least, (tokens - self._cap_t) / self._rate_t)
        return max(0.0, self._wait(requests, tokens) - least)

    def reserve(self, requests: int = 1, tokens: int = 0) -> float:
        """Take ``requests`` and ``tokens`` now; return the seconds the caller must wait first."""
        self._refill()
        wait = self._wait(requests, tokens)
        if self._rate_r:
            self._level_r -= requests
        if self._rate_t:
            self._level_t -= tokens
        return wait


class _Pacer:
    """Counts a limiter's requests and the slots it gave up (see :data:`LATE_S`).

    Lateness is judged against this caller's usual lateness (the median of its last 64
    wakes), which is what the request N slots later will most likely have: a 429 comes
    of the difference. A host whose every wake is late by the same amount sends evenly
    spaced all the same and needs no new slots; a stall makes a few wakes much later
    than the usual ones, all at once, and those would go out in a burst.
    """

    def __init__(self) -> None:
        self.acquired = 0
        self.reslots = 0
        self._recent: deque[float] = deque(maxlen=64)

    def usual(self) -> float:
        if len(self._recent) < 8:
            return 0.0
        return sorted(self._recent)[len(self._recent) // 2]

    def give_up(self, late: float, uncertainty: float, attempt: int) -> bool:
        """Whether a caller ``late`` seconds past its slot should take a new one.

        ``uncertainty``: how far the slot's moment itself may be off (the round trip to
        the actor); when that is as large as the threshold, lateness cannot be told.
        """
        usual = self.usual()
        self._recent.append(late)
        if (late - usual <= LATE_S or uncertainty > LATE_S or attempt >= MAX_RESLOTS
                or self.reslots >= RESLOT_FREE + RESLOT_SHARE * self.acquired):
            return False
        self.reslots += 1
        return True

    async def sleep_until(self, deadline: float, clock: Callable[[], float]) -> float:
        """Sleep until ``deadline`` on ``clock``; returns how late the caller woke."""
        delay = deadline - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return clock() - deadline


class LocalRateLimiter:
    """The same bucket inside one process: for single-process use (a script, a judge run)."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float = BURST_S,
                 headroom: float = HEADROOM):
        self.bucket = TokenBucket(rpm, tpm, burst_s, headroom=headroom)
        self.pacer = _Pacer()

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        clock = self.bucket.clock
        for attempt in range(MAX_RESLOTS + 1):
            deadline = clock() + self.bucket.reserve(requests, tokens)
            late = await self.pacer.sleep_until(deadline, clock)
            if not self.pacer.give_up(late, 0.0, attempt):
                break
        self.pacer.acquired += 1


# per process, by bucket name: the shares paced while a bucket's actor starts, and the
# buckets whose actor has answered (a later client goes straight to it)
_starting: dict[str, LocalRateLimiter] = {}
_answered: set[str] = set()


def share_limits(rpm: float | None, tpm: float | None, shares: int
                 ) -> tuple[float, float | None] | None:
    """One worker's (rpm, tpm) while a bucket's actor starts, or None: wait for the actor.

    A share paced at r requests/s may send r + 1 in a second (its phase is its own), so
    each gives one request/s up: S shares send at most S(rpm/60/S - 1) + S = rpm/60 in
    any second. Shares need a requests limit (under tokens alone one request's size is
    unknown) and one of at least two requests/s per worker.
    """
    if not rpm or rpm / shares - 60.0 < 60.0:
        return None
    share = rpm / shares - 60.0
    return share, tpm * share / rpm if tpm else None


def _share_of(name: str, rpm: float | None, tpm: float | None, shares: int
              ) -> LocalRateLimiter | None:
    """This process's share of a starting bucket: every client of the process uses one.
    It starts empty (its first slot one interval on), so a worker that meets an actor
    already running sends nothing the actor does not know of."""
    if name in _answered:
        return None
    if name not in _starting:
        limits = share_limits(rpm, tpm, shares)
        if limits is None:
            return None
        share = LocalRateLimiter(*limits)
        share.bucket.reserve(1)
        _starting[name] = share
    return _starting[name]


async def _slot_unless(share: LocalRateLimiter, answered: asyncio.Future, requests: int,
                       tokens: int) -> bool:
    """Wait for a slot of ``share``, unless the actor answers first: True when it came."""
    delay = share.bucket.reserve(requests, tokens)
    if delay > 0:
        sleep = asyncio.ensure_future(asyncio.sleep(delay))
        await asyncio.wait({sleep, answered}, return_when=asyncio.FIRST_COMPLETED)
        if not sleep.done():  # the slot is abandoned: the share is not used again
            sleep.cancel()
            return False
    return True


class _BucketActor:
    """The Ray actor holding the one bucket of an endpoint+model (made remote lazily).

    An async actor: a caller's ``reserve_at`` waits in a heap (priority, arrival) until
    the granting loop gives it the next slot, :data:`LEAD_S` before that slot's moment.
    """

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float = BURST_S,
                 headroom: float = HEADROOM, shares: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.bucket = TokenBucket(rpm, tpm, burst_s, clock, headroom)
        self.reserved = 0  # requests reserved (slots given up included)
        self.shared = 0  # requests sent on the workers' shares before this actor answered
        self._first_after = 0  # the first slot comes this many slots on (see configure)
        self._granted = False
        self._owe(shares)
        self._waiting: list[tuple[int, int, int, int, asyncio.Future]] = []
        self._arrival = itertools.count()
        self._granting: asyncio.Task | None = None

    def _owe(self, shares: int) -> None:
        """Before the first slot, pay back the last share request of each of ``shares``
        workers (they may come just before the handover)."""
        if not self._granted and share_limits(self.bucket.rpm, self.bucket.tpm, shares):
            self._first_after = max(self._first_after, shares + 1)

    async def configure(self, rpm: float | None, tpm: float | None, shares: int = 1) -> None:
        if (rpm, tpm) != (self.bucket.rpm, self.bucket.tpm):
            self.bucket.configure(rpm, tpm)
        self._owe(shares)

    async def reserve_at(self, requests: int = 1, tokens: int = 0, priority: int = 0
                         ) -> tuple[float, float]:
        """The wait and this process's wall clock when it was reckoned (see RayRateLimiter)."""
        granted: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrival), requests, tokens, granted))
        if self._granting is None or self._granting.done():
            self._granting = asyncio.create_task(self._grant())
        return await granted

    async def _grant(self) -> None:
        """Hand out slots, earliest batch first, while anyone waits."""
        while self._waiting:
            _, _, requests, tokens, granted = self._waiting[0]
            if granted.done():  # the caller is gone
                heapq.heappop(self._waiting)
                continue
            early = self.bucket.avoidable_wait(requests, tokens) - LEAD_S
            if early > 0:  # whoever is first when the slot comes near gets it
                await asyncio.sleep(early)
                continue
            heapq.heappop(self._waiting)
            if not self._granted:
                self._granted = True
                self.bucket.reserve(self._first_after)
            self.reserved += requests
            granted.set_result((self.bucket.reserve(requests, tokens), time.time()))

    async def count_shared(self, requests: int) -> None:
        """A worker sent ``requests`` on its share while this actor was starting."""
        self.shared += requests

    async def counts(self) -> dict[str, int]:
        """Requests reserved so far (those sent plus the slots late callers gave up), and
        those sent on the workers' shares before this actor answered."""
        return {"reserved": self.reserved, "shared": self.shared}

    async def node(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def limits(self) -> tuple[float | None, float | None]:
        return self.bucket.rpm, self.bucket.tpm


def limiter_name(base_url: str, model: str) -> str:
    """One bucket per endpoint and model: that is how providers count quotas."""
    digest = hashlib.sha256(f"{base_url}|{model}".encode()).hexdigest()[:12]
    return f"gleaner-ratelimit-{digest}"


def ensure_rate_limiter(
    name: str, rpm: float | None, tpm: float | None, burst_s: float = BURST_S,
    headroom: float = HEADROOM, shares: int = 1,
) -> Any:
    """Create (or find) the named bucket actor; call from the flow so the flow owns it.

    ``shares``: how many workers pace themselves at a share of the limits until a new
    actor answers (see :func:`share_limits`).

    The name is registered at once (``get_if_exists`` asks the GCS), but a new actor
    needs a worker process of its own: seconds on a busy host. Without ``wait`` the
    caller goes on (the stage submits its batches, which take as long to start) and
    the workers' first reservations wait for the actor instead. An existing actor is
    told the limits now, seconds before any batch of this stage can ask.
    """
    import ray

    # every request in flight on the cluster may wait in the actor at once
    actor_class = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)(_BucketActor)
    handle = actor_class.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
        rpm, tpm, burst_s, headroom, shares
    )
    handle.configure.remote(rpm, tpm, shares)
    return handle


class RayRateLimiter:
    """What a worker holds: the name of the cluster-wide bucket, resolved on first use.

    The bucket spaces the reservations evenly; what the endpoint sees is when the
    requests arrive. A caller that slept the returned wait from the moment the answer
    reached it would add the actor's reply latency (a few ms, tens of ms on a loaded
    host) to every request, unevenly. So the actor also says when (on its wall clock)
    it reckoned the wait, and the caller sleeps until that moment plus the wait. The
    actor's moment lies between the call and the answer; clamped to them, a clock of
    another node that is off by more than the round trip costs nothing worse than
    the reply latency. A caller that wakes too late for its slot takes a new one
    (:data:`LATE_S`): on the actor's node the slot's moment is exact (one clock), on
    another node it is known to within the round trip, so lateness is judged only when
    that is shorter than the threshold.
    """

    def __init__(self, name: str, namespace: str = NAMESPACE, *, rpm: float | None = None,
                 tpm: float | None = None, shares: int = 1):
        self.name = name
        self.namespace = namespace
        # the limits and how many workers share them while the actor starts (see the module)
        self.rpm, self.tpm, self.shares = rpm, tpm, max(1, shares)
        self._handle: Any = None
        self._met: asyncio.Task | None = None  # done once the actor has answered
        self._same_node = False  # the actor runs on this node: its clock is this one
        self.pacer = _Pacer()

    async def _meet_actor(self) -> None:
        import ray

        here = ray.get_runtime_context().get_node_id()
        node = await self._handle.node.remote()  # answers once the actor is up
        self._same_node = here is not None and node == here
        _answered.add(self.name)
        _starting.pop(self.name, None)

    def _find(self) -> Any:
        """The bucket's actor, made again when it is gone: its owner (a driver that shared
        the bucket, or the previous stage's, whose actor was still dying when this stage
        found it by name) has ended. A bucket's loss then costs a second, not the stage."""
        import ray

        try:
            return ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return ensure_rate_limiter(self.name, self.rpm, self.tpm, shares=1)

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        from ray.exceptions import RayActorError

        for attempt in range(FIND_TRIES):
            try:
                return await self._acquire(requests, tokens)
            except RayActorError:  # the actor died under us: find it (or make it) again
                if attempt + 1 == FIND_TRIES:
                    raise
                if self._met is None or self._met.done():  # unless another caller already is
                    self._handle, self._met = None, None
                await asyncio.sleep(0.5 * attempt)  # a dying actor may still hold its name

    async def _acquire(self, requests: int, tokens: int) -> None:
        if self._met is None:
            self._handle = self._find()
            self._met = asyncio.ensure_future(self._meet_actor())
        if not self._met.done():
            share = _share_of(self.name, self.rpm, self.tpm, self.shares)
            if share is not None and await _slot_unless(share, self._met, requests, tokens):
                self._handle.count_shared.remote(requests)  # for the actor's counts
                self.pacer.acquired += 1
                return
        await self._met
        for attempt in range(MAX_RESLOTS + 1):
            called = time.time()
            wait, reckoned = await self._handle.reserve_at.remote(requests, tokens,
                                                                  _priority.get())
            answered = time.time()
            deadline = min(max(reckoned, called), answered) + wait
            late = await self.pacer.sleep_until(deadline, time.time)
            uncertainty = 0.0 if self._same_node else answered - called
            if not self.pacer.give_up(late, uncertainty, attempt):
                break
        self.pacer.acquired += 1
