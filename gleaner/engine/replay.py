"""A stage's own worker, run against answers that come from the provider's Batch API.

The Batch API path needs no code of its own per stage. It runs the stage's
:class:`~gleaner.engine.stage.AsyncBatchWorker` row by row against a
:class:`ReplayClient`: a client with :class:`~gleaner.llm.client.LLMClient`'s
interface that builds the very request body ``LLMClient`` would send (the same
builders) and answers it from the batch output, matched by ``custom_id``, read
by the same code (:func:`~gleaner.llm.client.read_completion`). So score
parsing, logprobs, parse retries and failed rows are the stage's own.

A call the client has no answer for records a :class:`BatchRequest` and stops
its row (:class:`NotAnswered`); :class:`ReplayWorker` raises :class:`Pending`
with every such request, which the runner sends as the next batch round. The
first replay has no answers at all, so it records exactly the requests the
synchronous path would send first; a parse retry asks the same body again,
which is a new request (the body's occurrence number is in its key), as the
synchronous path would send it again.

Keys: ``<example id>-<body hash>[-<occurrence>]``; a key sent again after the
provider lost it (error file, an expired or cancelled batch, a 5xx line) goes
out as ``<key>~<attempt>``, so no ``custom_id`` is ever sent twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pyarrow as pa

from gleaner.config import EndpointConfig
from gleaner.llm.client import (
    Completion,
    LLMError,
    Usage,
    chat_request,
    classify_error,
    completion_request,
    is_transient,
    read_completion,
    request_body,
)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


def body_hash(url: str, body: Mapping[str, Any]) -> str:
    blob = json.dumps([url, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def key_of(custom_id: str) -> str:
    """The request a ``custom_id`` answers (without the resubmission suffix)."""
    return custom_id.split("~", 1)[0]


@dataclass(frozen=True)
class BatchRequest:
    """One line of a batch input file: exactly what the synchronous path would POST."""

    key: str
    example_id: str
    attempt: int  # 0 the first time; n after the provider lost it n times
    url: str
    body: dict[str, Any]
    endpoint: EndpointConfig

    @property
    def custom_id(self) -> str:
        return self.key if self.attempt == 0 else f"{self.key}~{self.attempt}"

    def line(self) -> bytes:
        return json.dumps({"custom_id": self.custom_id, "method": "POST", "url": self.url,
                           "body": self.body}, ensure_ascii=False, separators=(",", ":")
                          ).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Answer:
    """One request's line read back: a response (any status), or why there is none."""

    custom_id: str
    status_code: int | None  # None: no response (error file entry, expired, missing)
    body: str | None  # the response body, JSON text
    error_code: str | None = None  # batch_expired, batch_cancelled, missing, ...
    error_message: str | None = None


ANSWER_SCHEMA = pa.schema([
    pa.field("custom_id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("status_code", pa.int32()),
    pa.field("body", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("batch_id", pa.string()),
])


@dataclass
class Policy:
    """What to do with a request the provider did not answer."""

    resubmits: int = 2
    retries_via: str = "batch"  # batch | sync
    can_submit: bool = True  # False once batch_api.max_rounds rounds were sent


class NotAnswered(LLMError):
    """No answer yet: the row stops here and its request goes into the next batch. Fatal in
    LLMError's sense, so every stage re-raises it as it must re-raise fatal errors."""

    def __init__(self, key: str):
        super().__init__(f"request {key} is not answered yet", attempts=0, transient=False,
                         kind="batch_pending", fatal=True)


class Pending(Exception):  # noqa: N818 (a state, not an error: rows wait for answers)
    """Rows of a batch wait for these requests; nothing of the batch is written."""

    def __init__(self, requests: list[BatchRequest], rows: int):
        super().__init__(f"{rows} rows wait for {len(requests)} requests")
        self.requests = requests
        self.rows = rows


@dataclass
class RowCalls:
    """The calls one row's processing made: occurrences per body, requests, batch usage."""

    example_id: str
    seen: Counter[str] = field(default_factory=Counter)
    pending: list[BatchRequest] = field(default_factory=list)
    wants_live: bool = False  # a request the policy sends synchronously, held back
    requests: int = 0  # answered from the batch output
    prompt_tokens: int = 0
    completion_tokens: int = 0


ROW: contextvars.ContextVar[RowCalls] = contextvars.ContextVar("gleaner_replay_row")


def status_error(endpoint: EndpointConfig, url: str, status: int, body: str | None
                 ) -> openai.APIStatusError:
    """A non-200 batch line as the SDK's error, so :func:`classify_error` names its cause."""
    try:
        document = json.loads(body) if body else {}
    except ValueError:
        document = {"message": body}
    data = document.get("error", document) if isinstance(document, dict) else document
    message = data.get("message") if isinstance(data, dict) else None
    request = httpx2.Request("POST", f"{(endpoint.base_url or '').rstrip('/')}{url}")
    response = httpx2.Response(status, request=request)
    return openai.APIStatusError(f"Error code: {status} - {message or data}", response=response,
                                 body=data)


class ReplayClient:
    """LLMClient's interface over batch answers (one endpoint + model).

    ``answers`` maps a key to its lines read back, oldest first; ``sent`` counts every line
    ever sent for a key (a request sent again gets the next ``~attempt``); ``live`` builds the
    real client for requests the policy sends synchronously.
    """

    def __init__(self, endpoint: EndpointConfig, answers: Mapping[str, Sequence[Answer]],
                 policy: Policy, live: Callable[[], Any] | None = None,
                 sent: Mapping[str, int] | None = None):
        self.endpoint = endpoint
        self.model = endpoint.model
        self.answers = answers
        self.sent = sent or {}
        self.policy = policy
        self.usage = Usage()
        self._live = live
        self._live_client: Any = None
        # False while other rows of the batch may still wait: a live answer made then would
        # be thrown away with the batch and paid again next round
        self.allow_live = True

    def __repr__(self) -> str:
        return f"ReplayClient(model={self.model!r})"

    async def __aenter__(self) -> ReplayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def aclose(self) -> None:
        if self._live_client is not None:
            await self._live_client.aclose()

    async def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int,
                   temperature: float = 0.0, logprobs: bool = False,
                   top_logprobs: int | None = None, **extra: Any) -> Completion:
        kwargs = chat_request(self.model, messages, max_tokens=max_tokens,
                              temperature=temperature, logprobs=logprobs,
                              top_logprobs=top_logprobs, **extra)

        async def live() -> Completion:
            return await self.live().chat(messages, max_tokens=max_tokens,
                                          temperature=temperature, logprobs=logprobs,
                                          top_logprobs=top_logprobs, **extra)

        return await self._answer(CHAT_URL, request_body(kwargs), live)

    async def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                       logprobs: int | None = None, **extra: Any) -> Completion:
        kwargs = completion_request(self.model, prompt, max_tokens=max_tokens,
                                    temperature=temperature, logprobs=logprobs, **extra)

        async def live() -> Completion:
            return await self.live().complete(prompt, max_tokens=max_tokens,
                                              temperature=temperature, logprobs=logprobs,
                                              **extra)

        return await self._answer(COMPLETIONS_URL, request_body(kwargs), live)

    def live(self) -> Any:
        if self._live is None:
            raise RuntimeError("batch_api.retries_via = sync needs a live client")
        if self._live_client is None:
            self._live_client = self._live()
        return self._live_client

    async def _answer(self, url: str, body: dict[str, Any],
                      live: Callable[[], Any]) -> Completion:
        row = ROW.get()
        digest = body_hash(url, body)
        occurrence = row.seen[digest]
        row.seen[digest] += 1
        key = f"{row.example_id}-{digest}" + (f"-{occurrence}" if occurrence else "")
        lines = list(self.answers.get(key, ()))
        for line in lines:
            if line.status_code == 200:
                completion = self._read(line, url)
                if completion is not None:
                    row.requests += 1
                    row.prompt_tokens += completion.prompt_tokens
                    row.completion_tokens += completion.completion_tokens
                    self.usage.add(completion)
                    self.usage.requests += 1
                    return completion
        for line in lines:  # an answer no resubmission changes (400, 401, 404 ...)
            if line.status_code is not None and line.status_code != 200:
                error = status_error(self.endpoint, url, line.status_code, line.body)
                if not is_transient(error):
                    raise classify_error(self.endpoint, error, len(lines))
        lost = len(lines)
        if lost > self.policy.resubmits:
            last = lines[-1]
            reason = last.error_code or (f"HTTP {last.status_code}" if last.status_code
                                         else "no answer")
            raise LLMError(
                f"the Batch API did not answer request {key} in {lost} batches "
                f"(last: {reason}: {last.error_message or last.body or ''})"[:1000],
                attempts=lost, transient=False, kind=batch_kind(last))
        if (lost or occurrence) and self.policy.retries_via == "sync":
            if self.allow_live:
                return await live()
            row.wants_live = True
            raise NotAnswered(key)
        if not self.policy.can_submit:
            raise LLMError(f"request {key} still had no answer after batch_api.max_rounds "
                           "batch rounds", attempts=lost, transient=False, kind="batch_rounds")
        attempt = max(lost, int(self.sent.get(key, 0)))
        row.pending.append(BatchRequest(key, row.example_id, attempt, url, body, self.endpoint))
        raise NotAnswered(key)

    @staticmethod
    def _read(line: Answer, url: str) -> Completion | None:
        """The body as the live client reads it; None when it is malformed (sent again)."""
        try:
            return read_completion(json.loads(line.body or ""), url == CHAT_URL, 1,
                                   time.perf_counter())
        except ValueError:
            return None


def batch_kind(line: Answer) -> str:
    """The error kind of a row the Batch API never answered (never 'transient': the batch of
    rows is written, with the cause, instead of being retried as unavailable)."""
    if line.error_code:
        code = line.error_code.removeprefix("batch_")
        return f"batch_{code}"[:40]
    return "batch_transient" if line.status_code else "batch_missing"


class ReplayWorker:
    """A BatchWorker: the stage's own worker, row by row, against :class:`ReplayClient` s.

    Rows whose every call has an answer become the batch's rows; if any row is still
    missing an answer, :class:`Pending` carries every request the rows need next.
    """

    def __init__(self, stage: Any,
                 answers_for: Callable[[list[str]], tuple[dict[str, list[Answer]],
                                                          Mapping[str, int]]],
                 policy: Policy,
                 record_usage: Callable[[list[str], list[dict[str, Any]]], None] | None = None):
        from gleaner.engine.stage import AsyncBatchWorker

        self.stage = stage
        self.inner = stage.open()
        if not isinstance(self.inner, AsyncBatchWorker):
            raise TypeError(f"{stage.name}: its worker {type(self.inner).__name__} is not an "
                            "AsyncBatchWorker, so it cannot run through the Batch API")
        self.answers_for = answers_for
        self.policy = policy
        self.record_usage = record_usage
        # the rows of the last process() call that used batch answers: id, requests, tokens
        self.usage_rows: list[dict[str, Any]] = []

    def process(self, rows: pa.Table) -> pa.Table:
        """Replay every row; synchronous calls only once no row waits for the Batch API."""
        ids = [str(i) for i in rows.column("id").to_pylist()]
        answers, sent = self.answers_for(ids)
        results = asyncio.run(self._all(rows, answers, sent, allow_live=False))
        pending = [r for calls, _ in results for r in calls.pending]
        if pending:
            unique = list({r.custom_id: r for r in pending}.values())
            raise Pending(unique, sum(1 for calls, _ in results if calls.pending))
        if any(calls.wants_live for calls, _ in results):
            results = asyncio.run(self._all(rows, answers, sent, allow_live=True))
            waiting = [calls for calls, table in results if table is None or calls.pending]
            if waiting:
                unique = list({r.custom_id: r for c in waiting for r in c.pending}.values())
                raise Pending(unique, len(waiting))
        self.usage_rows = [{"id": calls.example_id, "requests": calls.requests,
                            "prompt_tokens": calls.prompt_tokens,
                            "completion_tokens": calls.completion_tokens}
                           for calls, _ in results if calls.requests]
        if self.record_usage is not None:  # before the part: a crash between costs no record
            self.record_usage(ids, self.usage_rows)
        tables = [table for _, table in results]
        return pa.concat_tables(tables) if tables else self.stage.schema.empty_table()

    async def _all(self, rows: pa.Table, answers: dict[str, list[Answer]],
                   sent: Mapping[str, int], allow_live: bool
                   ) -> list[tuple[RowCalls, pa.Table | None]]:
        clients: dict[tuple[str | None, str], ReplayClient] = {}

        def factory(endpoint: EndpointConfig) -> ReplayClient:
            name = (endpoint.base_url, endpoint.model)
            if name not in clients:
                clients[name] = ReplayClient(endpoint, answers, self.policy,
                                             lambda: self.stage.live_client(endpoint), sent)
                clients[name].allow_live = allow_live
            return clients[name]

        self.stage.client_factory = factory
        try:
            results = await asyncio.gather(*(self._row(rows.slice(i, 1))
                                             for i in range(rows.num_rows)))
            # calls a row's worker started before it stopped: let them record, then go on
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            await asyncio.gather(*others, return_exceptions=True)
            return results
        finally:
            self.stage.client_factory = None
            for client in clients.values():
                await client.aclose()

    async def _row(self, row: pa.Table) -> tuple[RowCalls, pa.Table | None]:
        calls = RowCalls(str(row.column("id")[0].as_py()))
        ROW.set(calls)
        try:
            return calls, await self.inner.aprocess(row, self.stage.client())
        except NotAnswered:
            return calls, None

    def close(self) -> None:
        self.inner.close()
