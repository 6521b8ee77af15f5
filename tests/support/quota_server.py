"""A loopback OpenAI-compatible server with a provider-style request quota, for tests and benches.

The quota is a **sliding (rolling) 1-second window**: a request is admitted when
fewer than ``rate`` requests were admitted in the ``window_s`` seconds before it
arrived, else it is answered ``429`` with ``Retry-After`` (and ``retry-after-ms``)
saying when the oldest admitted request leaves the window. That is the strictest
usual way providers count (a rolling window, no burst credit: ``rate`` requests at
once are fine, ``rate + 1`` within one second are not), so a client that passes here
also passes a token-bucket quota of the same rate. ``mode="bucket"`` gives that
more lenient quota instead (capacity ``rate``, refilled at ``rate`` per second).
Rejected requests do not count against the quota.

Every request is recorded (arrival time on ``time.monotonic()``, admitted or not,
route, and whether it is a stage's probe request), and the helpers below compute
what the rate-limit tests and benchmark report: admitted requests per second over
the window from the first to the last request, quota use, and the share of 429s.

Admitted requests take ``latency_s`` (50 ms by default) to answer, so a client
needs several requests in flight to reach the quota; 429s are answered at once.
Answers (see :func:`default_answer`):

- chat completions for the judge (a prompt with "[The Start of Assistant 1's Answer]"):
  the review "8 6\\n...";
- other chat completions (the rater): a first line with the score "4";
- completions (DEITA's scorers): "4" with top_logprobs over "1".."6".

It is :class:`tests.support.openai_server.OpenAIStub` with a responder that
enforces the quota, served from a child process (or, ``process=False``, from a
thread of the calling process).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from tests.support.openai_server import OpenAIStub, Reply, request_text

JUDGE_MARK = "[The Start of Assistant 1's Answer]"
# What the stages' probe requests ask (one each, before the batches and the limiter): the
# rater's and DEITA scorer's probe example "Say hello.", the judge's pair "Say OK."
PROBE_MARKS = ("Say hello.", "[Question]\nSay OK.\n")


@dataclass(frozen=True)
class Record:
    t: float  # arrival, time.monotonic()
    admitted: bool
    route: str  # "chat" or "completions"
    probe: bool  # a stage's probe request


def route_of(body: dict[str, Any]) -> str:
    return "chat" if "messages" in body else "completions"


def is_probe(body: dict[str, Any]) -> bool:
    text = request_text(body)
    return any(mark in text for mark in PROBE_MARKS)


def default_answer(body: dict[str, Any]) -> Reply:
    """A rater's, a judge's or DEITA scorer's answer, by what the request asks."""
    if route_of(body) == "completions":
        top = {"4": math.log(0.6), "3": math.log(0.25), "5": math.log(0.1), "6": math.log(0.05)}
        return Reply(content="4", top_logprobs=[top])
    if JUDGE_MARK in request_text(body):
        return Reply(content="8 6\nAssistant 1 answers more precisely than Assistant 2.")
    return Reply(content="4\nThe answer is accurate; a few details are missing.")


class Quota:
    """The admission rule alone (thread-safe): a sliding window or a token bucket."""

    def __init__(self, rate: float, window_s: float = 1.0,
                 mode: Literal["sliding", "bucket"] = "sliding",
                 clock: Callable[[], float] = time.monotonic):
        if mode not in ("sliding", "bucket"):
            raise ValueError(f"unknown quota mode {mode!r}")
        self.rate, self.window_s, self.mode = rate, window_s, mode
        self.limit = max(1, int(rate * window_s))  # requests per window
        self._clock = clock
        self._lock = threading.Lock()
        self._admitted: deque[float] = deque()
        self._level, self._last = float(self.limit), clock()

    def admit(self, now: float | None = None) -> tuple[bool, float]:
        """(admitted, seconds until a request would be admitted) for a request arriving now."""
        with self._lock:
            now = self._clock() if now is None else now
            if self.mode == "bucket":
                per_s = self.limit / self.window_s
                self._level = min(self.limit, self._level + (now - self._last) * per_s)
                self._last = now
                if self._level >= 1.0:
                    self._level -= 1.0
                    return True, 0.0
                return False, (1.0 - self._level) / per_s
            window = self._admitted
            while window and window[0] <= now - self.window_s:
                window.popleft()
            if len(window) < self.limit:
                window.append(now)
                return True, 0.0
            return False, window[0] + self.window_s - now


class QuotaServer:
    """``with QuotaServer(rate=40) as server: ... server.base_url ... server.stats()``.

    ``process=True`` (the default) serves from a child process of its own: a provider
    does not share a GIL with the flow's driver, and a server thread inside the driver
    (Prefect's flow engine, its API clients, its log shipping) would be held up now and
    then and take a burst of requests that were sent evenly for one that was not: the
    quota would judge the test rig's stalls, not the client's pacing. Arrival times are
    ``time.monotonic()``, one clock for every process of the host.
    """

    def __init__(self, rate: float, *, window_s: float = 1.0, latency_s: float = 0.05,
                 mode: Literal["sliding", "bucket"] = "sliding",
                 answer: Callable[[dict[str, Any]], Reply] = default_answer,
                 model: str = "quota-model", process: bool = True):
        self.rate = rate
        self.process = process
        self._settings = {"rate": rate, "window_s": window_s, "latency_s": latency_s,
                          "mode": mode, "answer": answer, "model": model}
        self.quota = Quota(rate, window_s, mode)
        self.latency_s = latency_s
        self.answer = answer
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self.stub = OpenAIStub(self._respond, model=model)
        self._child: Any = None
        self._conn: Any = None
        self._port: int | None = None

    # ---- the responder (in the process that serves) ----------------------------------------
    def _respond(self, body: dict[str, Any]) -> Reply:
        now = time.monotonic()
        admitted, retry_after = self.quota.admit(now)
        with self._lock:
            self.records.append(Record(now, admitted, route_of(body), is_probe(body)))
        if not admitted:
            # what providers send: seconds (here with a fraction: the openai SDK reads floats)
            # and the same in milliseconds; both say when the window has room again
            wait = max(0.001, retry_after)
            return Reply(status=429, error_message="Rate limit reached for requests",
                         headers={"Retry-After": f"{wait:.3f}",
                                  "retry-after-ms": str(max(1, math.ceil(wait * 1000)))})
        reply = self.answer(body)
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if reply.status == 200 and not reply.delay_s:
            reply.delay_s = self.latency_s
        return reply

    # ---- lifecycle / access -----------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.process:
            return f"http://127.0.0.1:{self._port}/v1"
        return self.stub.base_url

    def _ask(self, command: str) -> Any:
        with self._lock:
            self._conn.send(command)
            return self._conn.recv()

    def snapshot(self) -> list[Record]:
        if self.process and self._child is not None:
            return [Record(*r) for r in self._ask("records")]
        with self._lock:
            return list(self.records)

    def reset(self) -> None:
        if self.process:
            self._ask("reset")
            return
        with self._lock:
            self.records.clear()
        self.stub.reset()

    def stats(self, *, include_probes: bool = False, since: float | None = None,
              until: float | None = None) -> QuotaStats:
        return quota_stats(self.snapshot(), self.rate, include_probes=include_probes,
                           since=since, until=until)

    def start(self) -> QuotaServer:
        if not self.process:
            self.stub.start()
            return self
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._child = context.Process(target=_serve, args=(child_end, self._settings),
                                      daemon=True, name="quota-server")
        self._child.start()
        if not self._conn.poll(60):
            self._child.kill()
            raise RuntimeError("the quota server process did not start")
        self._port = self._conn.recv()
        return self

    def stop(self) -> None:
        if not self.process:
            self.stub.stop()
            return
        if self._child is not None:
            with contextlib.suppress(EOFError, OSError):
                self.records = self.snapshot()  # kept: the figures can be had after the stop
                self._ask("stop")
            self._child.join(timeout=15)
            if self._child.is_alive():
                self._child.kill()
            self._child = None

    def __enter__(self) -> QuotaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(conn: Any, settings: dict[str, Any]) -> None:
    """The child process: serve, and answer the parent's commands until told to stop."""
    server = QuotaServer(**settings, process=False).start()
    conn.send(server.stub.port)
    while True:
        command = conn.recv()
        if command == "records":
            conn.send([(r.t, r.admitted, r.route, r.probe) for r in server.snapshot()])
        elif command == "reset":
            server.reset()
            conn.send(None)
        elif command == "stop":
            server.stop()
            conn.send(None)
            return


# ---- figures ---------------------------------------------------------------------------------
@dataclass
class QuotaStats:
    rate: float  # the quota, requests/s
    requests: int
    admitted: int
    rejected: int  # answered 429
    first: float | None  # monotonic time of the first and last request counted
    last: float | None
    by_route: dict[str, int]
    peak_offered: int  # most requests (admitted or not) that arrived within one second
    # the shortest time in which limit + 1 requests arrived (admitted or not): under the
    # window, the last of them was (or would have been) answered 429; None: too few requests
    tightest_s: float | None = None
    # time within the window with no request at all (gaps beyond two paced spacings, less
    # one spacing each): the stage had nothing in flight (e.g. every batch slot between
    # two batches)
    idle_s: float = 0.0

    @property
    def share_429(self) -> float:
        return self.rejected / self.requests if self.requests else 0.0

    @property
    def window_s(self) -> float:
        return (self.last - self.first) if self.first is not None and self.last is not None \
            else 0.0

    @property
    def admitted_per_s(self) -> float:
        """Admitted requests per second between the first and the last request."""
        return self.admitted / self.window_s if self.window_s > 0 else 0.0

    @property
    def use(self) -> float:
        """Share of the quota used over the request window (first to last request)."""
        return self.admitted_per_s / self.rate if self.rate else 0.0

    def use_over(self, seconds: float) -> float:
        """Share of the quota used over another span (e.g. the whole stage's time)."""
        return self.admitted / seconds / self.rate if seconds > 0 and self.rate else 0.0

    def line(self) -> str:
        return (f"{self.requests} requests, {self.rejected} answered 429 ({self.share_429:.2%}), "
                f"{self.admitted_per_s:.2f} admitted/s over {self.window_s:.1f} s = "
                f"{self.use:.1%} of {self.rate:g}/s; peak offered {self.peak_offered} in 1 s"
                + (f", tightest {self.limit_plus_one} in {self.tightest_s * 1000:.0f} ms"
                   if self.tightest_s is not None else "")
                + f", idle {self.idle_s:.1f} s")

    @property
    def limit_plus_one(self) -> int:
        return int(self.rate) + 1


def quota_stats(records: Iterable[Record], rate: float, *, include_probes: bool = False,
                since: float | None = None, until: float | None = None) -> QuotaStats:
    """Figures over the requests recorded (probes left out unless asked for)."""
    chosen = sorted((r for r in records
                     if (include_probes or not r.probe)
                     and (since is None or r.t >= since) and (until is None or r.t <= until)),
                    key=lambda r: r.t)
    admitted = sum(1 for r in chosen if r.admitted)
    times = [r.t for r in chosen]
    peak, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    spacing = 1.0 / rate if rate else 0.0
    idle = sum(b - a - spacing for a, b in itertools.pairwise(times) if b - a > 2 * spacing)
    span = max(1, int(rate))  # limit + 1 requests are ``span`` gaps apart
    tightest = min((times[k + span] - times[k] for k in range(len(times) - span)), default=None)
    return QuotaStats(rate=rate, requests=len(chosen), admitted=admitted,
                      rejected=len(chosen) - admitted,
                      first=times[0] if times else None, last=times[-1] if times else None,
                      by_route=dict(Counter(r.route for r in chosen)), peak_offered=peak,
                      tightest_s=tightest, idle_s=idle)


# ---- the three LLM stages against the server (shared by tests/test_rate_limits.py and
# bench/bench_quota.py; need a Prefect API and Ray, as the flows do) --------------------------
STAGES = ("rate", "score", "judge")
# requests each input row costs when nothing fails: a rating, complexity + quality, two orders
REQUESTS_PER_ROW = {"rate": 1, "score": 2, "judge": 2}


@dataclass
class StageRun:
    stage: str
    rows: int
    summary: dict[str, Any]  # the engine's stage summary
    started: float  # monotonic, around the flow call
    ended: float
    stage_seconds: float  # run_stage's own time (plan, probe, batches, summary)

    @property
    def flow_seconds(self) -> float:
        return self.ended - self.started


def run_stage_against(stage: str, server: QuotaServer, store_url: str, run_id: str, rows: int,
                      *, rpm: int | None, batch_size: int, concurrency: int,
                      workdir: str | None = None, **overrides: Any) -> StageRun:
    """Run one LLM stage's flow (rate, score through an endpoint, or judge two answer files)
    over ``rows`` fresh inputs against ``server``; cache off, so every row is asked."""
    from pathlib import Path

    from gleaner.config import GleanerConfig
    from gleaner.engine import read_summary
    from gleaner.store import Store

    store = Store(store_url)
    endpoint = {"base_url": server.base_url, "model": "quota-model", "rpm": rpm,
                "timeout_s": 30.0}
    resources = {"batch_size": batch_size, "concurrency": concurrency, "retry_delay_s": 0}
    values: dict[str, Any] = {"store.url": store_url}
    if stage == "rate":
        from gleaner.flows.rate_flow import run_rate
        from gleaner.schema import examples_to_table
        from tests.support.faults import examples

        store.write_part(run_id, "ingest", 0, examples_to_table(
            examples([f"{run_id}-{i}" for i in range(rows)])))
        values.update({f"rate.endpoint.{k}": v for k, v in endpoint.items()})
        values.update({f"rate.resources.{k}": v for k, v in resources.items()})
        values.update({"rate.mode": "explain", "rate.cache": False})
        config = GleanerConfig().with_overrides({**values, **overrides})
        started = time.monotonic()
        summary = run_rate(config, run_id)
        ended = time.monotonic()
    elif stage == "score":
        from gleaner.flows.deita_flow import run_score
        from gleaner.schema import Example, examples_to_table

        pool = [Example("quota", i, f"Task {run_id} {i}: explain item {i}.",
                        output=f"Item {i} explained.") for i in range(rows)]
        store.write_part(run_id, "ingest", 0, examples_to_table(pool))
        values.update({"score.backend": "endpoint", "score.endpoint": endpoint,
                       "score.cache": False})
        values.update({f"score.resources.{k}": v for k, v in resources.items()})
        config = GleanerConfig().with_overrides({**values, **overrides})
        started = time.monotonic()
        summary = run_score(store, run_id, config)
        ended = time.monotonic()
    elif stage == "judge":
        import json
        import tempfile

        from gleaner import layout
        from gleaner.flows.evaluate_flow import evaluate_flow

        folder = Path(workdir or tempfile.mkdtemp(prefix="quota-judge-"))
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for side in ("a", "b"):
            path = folder / f"{side}.jsonl"
            path.write_text("".join(
                json.dumps({"prompt": f"Question {run_id} {i}?", "answer": f"{side} answer {i}."})
                + "\n" for i in range(rows)))
            paths.append(str(path))
        values.update({f"evaluate.endpoint.{k}": v for k, v in endpoint.items()})
        values.update({f"evaluate.resources.{k}": v for k, v in resources.items()})
        values.update({"evaluate.cache": False})
        config = GleanerConfig().with_overrides({**values, **overrides})
        started = time.monotonic()
        result = evaluate_flow(run_id=run_id, config=config, answers_a=paths[0],
                               answers_b=paths[1])
        ended = time.monotonic()
        summary = read_summary(store, run_id, layout.judge_stage(result["comparison"],
                                                                 "answers")) or {}
    else:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    return StageRun(stage, rows, summary, started, ended, float(summary.get("seconds", 0.0)))
