"""The cluster-wide rate limit on every LLM stage, against a server that enforces a quota.

Rating, DEITA scoring through an endpoint and judging each run as their real
flows (real Prefect API, real Ray with 2 CPUs: two batches in flight, in two worker
processes sharing the limiter actor, ``CONCURRENCY`` requests each) against
:class:`tests.support.quota_server.QuotaServer` in a process of its own: a loopback
OpenAI-compatible server admitting ``QUOTA`` requests per rolling 1-second window and
answering 429 with Retry-After beyond it, 50 ms per answer. The stages are told the
quota (``rpm = 60 * QUOTA``); without the limiter the same concurrency offers several
times the quota (the last test).

Asserted per stage:
- at most 2 % of the requests are answered 429 (the issue's goal, unchanged);
- the quota is used: admitted requests/s over the request window (the first to the
  last batch request; the probe each stage sends before its batches is left out) is at
  least ``MIN_USE`` of the quota. The issue's 95 % is the benchmark's goal
  (bench/bench_quota.py, 40 req/s, thousands of requests). Here a run lasts ~12 s on a
  shared 2-core box (load averages of 5-14 from other work were seen while this was
  written), where the limiter's own headroom (1.5 %), a slot given up by a stalled
  process and the start and end of a short window each cost a few percent, so the
  bound is 85 %: it still fails a limiter that paces well under the told rate, and the
  429 bound fails one that does not pace (or bursts) at all.
The two fast tests check the bucket against the same rolling window with a fake clock
(the old one-second burst overflows it) and the bounds on giving up late slots.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gleaner.llm import ratelimit
from gleaner.llm.ratelimit import TokenBucket
from tests.support.quota_server import REQUESTS_PER_ROW, Quota, QuotaServer, run_stage_against

# rates measured against the wall clock: run alone, never beside a second test process
pytestmark = pytest.mark.timing

QUOTA = 20  # requests/s the server admits (rolling 1-second window)
RPM = 60 * QUOTA  # what the stages are told
MIN_USE = 0.85
MAX_429 = 0.02
CONCURRENCY = 16
REQUESTS = 240  # per stage: ~12 s at the quota
# two batches, one per Ray CPU, in flight together: the test is about the limiter shared
# by two processes; the cost of batch boundaries (both slots between batches) is the
# benchmark's figure, with thousands of requests
BATCH_SIZE = REQUESTS // 2


def _sent_by(bucket: TokenBucket, now: list[float], callers: int, rounds: int) -> list[float]:
    """When ``callers`` coroutines, each waiting out its reservation and then asking again,
    send: the reservation times of a saturated limiter (fake clock)."""
    sent: list[float] = []
    free_at = [now[0]] * callers
    for _ in range(rounds):
        for i in range(callers):
            now[0] = max(now[0], free_at[i])
            free_at[i] = now[0] + bucket.reserve(1, 0)
            sent.append(free_at[i])
    return sorted(sent)


@pytest.mark.parametrize(("burst_s", "headroom", "rejected"), [
    (1.0, 0.0, True),  # the old bucket: a full second of burst, then the full rate
    (ratelimit.BURST_S, ratelimit.HEADROOM, False),  # what the limiters use now
])
def test_the_bucket_fits_a_rolling_window(burst_s, headroom, rejected) -> None:
    """After an idle spell, callers that the limiter lets through all fit a rolling 1-second
    window of the told rate; a bucket that saved a second of burst sends up to twice it."""
    now = [100.0]
    bucket = TokenBucket(rpm=RPM, tpm=None, burst_s=burst_s, clock=lambda: now[0],
                         headroom=headroom)
    quota = Quota(QUOTA, clock=lambda: now[0])
    sent = _sent_by(bucket, now, callers=32, rounds=10)
    answers = [quota.admit(t)[0] for t in sent]
    assert (not all(answers)) is rejected
    if not rejected:
        span = sent[-1] - sent[0]
        assert len(sent) / span == pytest.approx(QUOTA * (1 - headroom), rel=0.01)


@pytest.mark.parametrize("shares", [1, 2, 3, 5, 8])
def test_the_handover_from_the_workers_shares_to_the_actor_fits_the_window(shares) -> None:
    """Workers pace at their shares, each with its own phase, while the actor starts; the
    worst handover has every worker's last request just before the actor's first slot.
    No rolling second, that one included, gets more than the quota; the shares use most
    of theirs."""
    rate, handover = 40, 102.0
    now = [100.0]
    quota = Quota(rate, clock=lambda: now[0])
    limits = ratelimit.share_limits(60 * rate, None, shares)
    assert limits is not None
    paced = limits[0] / 60 * (1 - ratelimit.HEADROOM)
    sent: list[float] = []
    for worker in range(shares):
        # the phase that puts this worker's last share slot 1-8 ms before the handover
        now[0] = handover - 0.001 * (worker + 1) - int((handover - 100.5) * paced) / paced
        share = TokenBucket(*limits, ratelimit.BURST_S, lambda: now[0], ratelimit.HEADROOM)
        share.reserve(1)  # starts empty, as a worker's share does
        while (at := now[0] + share.reserve(1)) < handover:
            sent.append(at)
            now[0] = at
    now[0] = handover
    actor = ratelimit._BucketActor(60 * rate, None, shares=shares, clock=lambda: now[0])

    async def ask_the_actor() -> None:
        for _ in range(3 * rate):
            wait, _ = await actor.reserve_at(1, 0, 0)
            now[0] += wait
            sent.append(now[0])

    asyncio.run(ask_the_actor())
    sent.sort()
    assert all(quota.admit(t)[0] for t in sent)
    def in_second(start: float) -> int:
        return sum(1 for t in sent if start <= t < start + 1.0)

    # the shares' second before the handover went out at their pace, the actor's after
    assert in_second(handover - 1.0) >= (rate - shares) * (1 - ratelimit.HEADROOM) - shares
    assert in_second(handover + 1.0) >= rate * (1 - ratelimit.HEADROOM) - 1


def test_a_caller_that_wakes_late_gives_its_slot_up_within_bounds() -> None:
    pacer = ratelimit._Pacer()
    late = ratelimit.LATE_S * 2
    assert not pacer.give_up(ratelimit.LATE_S / 2, 0.0, 0)  # on time: send
    assert pacer.give_up(late, 0.0, 0)  # stalled past the slot: take a new one
    assert not pacer.give_up(late, ratelimit.LATE_S * 2, 0)  # the slot's moment is unsure
    assert not pacer.give_up(late, 0.0, ratelimit.MAX_RESLOTS)  # new slots per request
    # a stall: a burst of wakes far later than the usual ones all take new slots
    for _ in range(20):
        pacer.give_up(0.002, 0.0, 0)
    given = pacer.reslots
    assert all(pacer.give_up(0.3 - i * 0.02, 0.0, 0) for i in range(12))
    assert pacer.reslots == given + 12
    # a host whose every wake is late by the same 50 ms: once that is usual, it sends
    steady = ratelimit._Pacer()
    answers = [steady.give_up(0.05, 0.0, 0) for _ in range(40)]
    assert not any(answers[16:]) and sum(answers) <= 8
    # and whatever the wakes, the slots given up are bounded
    bounded = ratelimit._Pacer()
    while bounded.give_up(10.0 * (1 + bounded.reslots), 0.0, 0):
        pass
    assert bounded.reslots == ratelimit.RESLOT_FREE


def test_the_earliest_batch_gets_the_slots_and_none_is_left_unused() -> None:
    """Two batches asking together: batch 0 gets every slot while it has a request waiting,
    batch 1 takes over the moment it ends (no slot lost at the turnover), and a batch that
    cannot use the whole quota (a slow model) leaves the rest to the next one."""
    rate = 50.0

    async def batch(actor, priority: int, callers: int, each: int, latency: float,
                    sent: list) -> None:
        async def caller() -> None:
            for _ in range(each):
                wait, reckoned = await actor.reserve_at(1, 0, priority)
                await asyncio.sleep(max(0.0, reckoned + wait - time.time()))
                sent.append((time.time(), priority))
                await asyncio.sleep(latency)  # the answer

        await asyncio.gather(*(caller() for _ in range(callers)))

    async def go(first: tuple[int, int, float]) -> list[tuple[float, int]]:
        actor = ratelimit._BucketActor(rpm=60 * rate, tpm=None)
        sent: list[tuple[float, int]] = []
        await asyncio.gather(batch(actor, 1, 8, 8, 0.02, sent),  # batch 1 asks first
                             batch(actor, 0, *first, sent))
        return sorted(sent)

    def use(sent: list[tuple[float, int]]) -> float:
        return (len(sent) - 1) / (sent[-1][0] - sent[0][0]) / rate

    sent = asyncio.run(go((8, 8, 0.02)))
    order = [priority for _, priority in sent]
    assert max(i for i, p in enumerate(order) if p == 0) < 64 + 4  # batch 0 went first
    assert use(sent) == pytest.approx(1 - ratelimit.HEADROOM, rel=0.04)

    # batch 0 sends 2 requests per 0.6 s: batch 1 gets the rest of the quota meanwhile
    sent = asyncio.run(go((2, 5, 0.5)))
    ends = {p: max(t for t, q in sent if q == p) for p in (0, 1)}
    assert ends[1] < ends[0] - 0.8  # batch 1 (64 requests) was done before batch 0 (10)
    while_both = [t for t, _ in sent if t <= ends[1]]
    assert use([(t, 0) for t in while_both]) == pytest.approx(1 - ratelimit.HEADROOM, rel=0.04)


def test_a_request_bigger_than_the_burst_is_granted_and_waits_for_its_tokens() -> None:
    """Under a tokens/min limit a long prompt exceeds what the bucket ever holds: it is
    granted at once and told to wait until its tokens have refilled, as before."""
    actor = ratelimit._BucketActor(rpm=None, tpm=60 * 1000 / (1 - ratelimit.HEADROOM))

    async def go() -> list[float]:
        started = time.time()
        slots = []
        for _ in range(3):
            wait, reckoned = await asyncio.wait_for(actor.reserve_at(1, 500), 5.0)
            slots.append(reckoned + wait - started)
        return slots

    slots = asyncio.run(go())  # 1,000 tokens/s: 500 tokens are half a second each
    assert slots == pytest.approx([0.5, 1.0, 1.5], abs=0.05)  # each pays its own tokens


def test_a_batch_asks_for_slots_at_its_own_index(tmp_path) -> None:
    """The engine runs a batch's worker at the batch's priority, down to the requests its
    coroutines make (asyncio.run and gather carry the context)."""
    from gleaner.config import StageSection
    from gleaner.engine.batches import BatchSpec, InputIndex
    from gleaner.engine.worker import StageJob, run_batch
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store
    from tests.support.toy_stage import ToyStage, ToyWorker

    store = Store(str(tmp_path / "store"))
    store.write_part("r", "ingest", 0, examples_to_table(
        [Example("toy", i, f"instruction {i}") for i in range(6)]))
    stage = ToyStage(StageSection(), control=str(tmp_path))
    seen: list[int] = []

    class Recording(ToyWorker):
        def process(self, rows):
            async def request() -> None:
                seen.append(ratelimit._priority.get())

            async def go() -> None:
                await asyncio.gather(request(), request())

            asyncio.run(go())
            return super().process(rows)

    index = InputIndex.build(store, "r", "ingest")
    job = StageJob(stage, "r", store.url, {}, "key", None)
    for number, (start, stop) in enumerate(index.bounds(3)):
        run_batch(job, BatchSpec(number + 7, index.segments(start, stop), stop - start),
                  Recording(stage))
    assert seen == [7, 7, 8, 8]
    assert ratelimit._priority.get() == 0  # and only inside the batch


def test_workers_share_the_limits_while_the_actor_starts(ray_local) -> None:
    """A new bucket's actor takes a Ray process of its own (a second or more) to answer.
    Meanwhile two workers (two Ray tasks, as two batches) each pace at their share of
    the limits; then both go over to the actor, and no rolling second, the handover's
    included, gets more than the quota."""
    import ray

    name = f"test-share-{time.time_ns()}"

    def worker(callers: int, each: int) -> list[float]:
        async def go() -> list[float]:
            limiter = ratelimit.RayRateLimiter(name, rpm=RPM, shares=2)
            sent: list[float] = []

            async def caller() -> None:
                for _ in range(each):
                    await limiter.acquire()
                    sent.append(time.time())
                    await asyncio.sleep(0.02)  # the answer

            await asyncio.gather(*(caller() for _ in range(callers)))
            return sent

        return asyncio.run(go())

    task = ray.remote(num_cpus=1)(worker)
    ray.get([task.remote(0, 0) for _ in range(2)])  # both worker processes up, as in a stage
    holder = ratelimit.ensure_rate_limiter(name, RPM, None, shares=2)
    created = time.time()
    futures = [task.remote(8, 5) for _ in range(2)]
    ray.get(holder.node.remote())
    answered = time.time()
    sent = sorted(t for times in ray.get(futures) for t in times)
    counts = ray.get(holder.counts.remote())
    ray.kill(holder)

    early = [t for t in sent if t < answered]
    print(f"\nactor answered after {answered - created:.2f} s; {len(early)} of {len(sent)} "
          f"requests sent before; counts {counts}")
    assert len(sent) == 80
    assert counts["shared"] > 0 and len(early) > 0  # work started before the actor was up
    assert counts["shared"] + counts["reserved"] >= len(sent)
    busiest = max(sum(1 for u in sent if t <= u < t + 1.0) for t in sent)
    assert busiest <= QUOTA, f"{busiest} requests in one second, quota {QUOTA}"
    # and the quota was used: 80 requests at 98.5 % of 20/s span about 4 s
    assert (len(sent) - 1) / (sent[-1] - sent[0]) >= 0.85 * QUOTA


@pytest.mark.parametrize("stage", ["rate", "score", "judge"])
def test_stage_uses_the_quota_without_429s(stage, prefect_api, ray_local, tmp_path) -> None:
    rows = REQUESTS // REQUESTS_PER_ROW[stage]
    with QuotaServer(rate=QUOTA, latency_s=0.05) as server:
        run = run_stage_against(stage, server, str(tmp_path / "store"), f"quota-{stage}", rows,
                                rpm=RPM, batch_size=BATCH_SIZE // REQUESTS_PER_ROW[stage],
                                concurrency=CONCURRENCY, workdir=str(tmp_path / "answers"))
        stats = server.stats()
        everything = server.stats(include_probes=True)
    print(f"\n{stage}: {stats.line()}; stage {run.stage_seconds:.1f} s, "
          f"flow {run.flow_seconds:.1f} s")
    assert run.summary["failed"] == 0 and run.summary["examples"] == rows
    assert stats.admitted == REQUESTS  # every row answered, each request admitted once
    assert everything.requests - stats.requests == 1  # the stage's probe
    assert stats.share_429 <= MAX_429, stats.line()
    assert stats.use >= MIN_USE, stats.line()
    assert stats.use <= 1.0 + 1.0 / stats.window_s  # nobody got more than the quota


def test_without_the_limiter_most_requests_are_answered_429(prefect_api, ray_local,
                                                           tmp_path) -> None:
    with QuotaServer(rate=QUOTA, latency_s=0.05) as server:
        run = run_stage_against("rate", server, str(tmp_path / "store"), "quota-none", 120,
                                rpm=None, batch_size=BATCH_SIZE, concurrency=CONCURRENCY,
                                **{"rate.endpoint.max_retries": 20, "rate.max_failed_share": 1.0})
        stats = server.stats()
    print(f"\nrate without rpm: {stats.line()}")
    assert run.summary["examples"] == 120
    assert stats.share_429 > 0.3, stats.line()
    assert stats.peak_offered > 2 * QUOTA


def test_a_bucket_whose_actor_is_gone_is_found_again_or_made_again(ray_local) -> None:
    """The bucket's owner may end while a stage uses it (a driver that shared the
    endpoint's quota finished; the previous stage's actor was still dying when this stage
    found it by name): a worker's next request finds or makes the bucket again, instead of
    failing every batch with 'Failed to look up actor'."""
    import ray

    name = f"test-gone-{time.time_ns()}"
    holder = ratelimit.ensure_rate_limiter(name, RPM, None)
    limiter = ratelimit.RayRateLimiter(name, rpm=RPM)  # one batch's: one event loop

    async def batch() -> tuple[object, object]:
        await limiter.acquire()
        await limiter._met  # the actor has answered
        first = limiter._handle
        ray.kill(holder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the name is free
            try:
                ray.get_actor(name, namespace=ratelimit.NAMESPACE)
                await asyncio.sleep(0.05)
            except ValueError:
                break
        await limiter.acquire()  # the old handle answers RayActorError: made again
        return first, limiter._handle

    first, then = asyncio.run(batch())
    again = ray.get_actor(name, namespace=ratelimit.NAMESPACE)
    assert then is not first
    assert ray.get(again.limits.remote()) == (RPM, None)
    assert ray.get(again.counts.remote())["reserved"] == 1
    ray.kill(again)
