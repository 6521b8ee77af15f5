"""The one row loop of every LLM stage: a stage says what to ask and how to read it.

A stage that calls an LLM per row (rating, grading, judging, rewriting, answering)
subclasses :class:`LLMRowStage` and writes one method, ``conversation(row)``: a
generator that yields a :class:`Call` (or a list of calls asked at once), receives
each :class:`Reading`, and returns the row's own fields::

    class Shout(LLMRowStage):
        def conversation(self, row):
            reading = yield Call(messages=[{"role": "user", "content": row["text"]}],
                                 parse=lambda completion: completion.text.upper())
            return {"shout": reading.value}

So a row may make a sequence of dependent calls (EVOL's M rewrites, then one
rank-and-score call). A conversation that catches :class:`RowFailed` and returns
says what it made before the failure (the row stays failed, with those fields).

Everything else lives here, once: asking through the stage's client (SDK back-off,
cluster-wide limits, the Batch API replay), parse retries (``Call.parse`` raises
:class:`ParseFailure` with the reason), a fatal client error stopping the stage,
a transport failure or a parse failure after the retries becoming a ``failed``
row with its error, kind and the last raw answer, and each row's attempts,
tokens and latency summed over all its calls.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from gleaner.engine.stage import AsyncBatchWorker, LLMStage, rows_table


class ParseFailure(ValueError):
    """The answer holds no value the stage can use; the message says why (asked again).
    ``raw``: what to keep of the answer when it was the last one (default its text);
    ``kind``: the failed row's ``error_kind``."""

    def __init__(self, reason: str, raw: str | None = None, kind: str = "parse"):
        super().__init__(reason)
        self.raw, self.kind = raw, kind


@dataclass(frozen=True)
class Reading:
    """What ``Call.parse`` read; ``raw``: what to keep of the answer (default its text).
    A call that ``may_fail`` reads ``value`` None with the ``error`` and its ``kind``."""

    value: Any
    raw: str | None = None
    error: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Call:
    """One request of a row: chat ``messages`` or a raw-text ``prompt``, and how to read it.

    ``parse`` gets the :class:`~gleaner.llm.client.Completion` and returns the value (or
    a :class:`Reading` to keep another raw text), or raises :class:`ParseFailure`.
    ``options``: more request fields (``logprobs``, ``top_logprobs``, ``stop``, ``seed``,
    ``extra_body`` such as llama.cpp's grammar). ``parse_retries`` None: the stage's.
    ``may_fail``: a failed call does not fail the row; the conversation gets a Reading with
    the error (AlpaGasus' judge keeps one order's review when the other order failed).
    """

    parse: Callable[[Any], Any]
    messages: Sequence[Mapping[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    parse_retries: int | None = None
    may_fail: bool = False  # a failure is read as a Reading, and the row goes on
    model: str | None = None  # which of the stage's endpoints (by model); None: the first


Conversation = Generator["Call | list[Call]", Any, "dict[str, Any]"]


class RowFailed(Exception):
    """The row cannot be made: a transport failure (after the client's retries) or no
    parseable answer after the parse retries."""

    def __init__(self, error: str, kind: str, raw: str | None):
        super().__init__(error)
        self.error, self.kind, self.raw = error, kind, raw


@dataclass
class RowCost:
    """Requests, tokens and time one row spent, over all its calls and retries."""

    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0

    def add(self, completion: Any) -> None:
        self.attempts += completion.attempts
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.latency_ms += completion.latency_ms

    def as_row(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_ms": self.latency_ms}


async def ask(client: Any, call: Call, parse_retries: int, cost: RowCost) -> Reading:
    """One call, asked again while its answer does not parse; a fatal error is raised as is."""
    from gleaner.llm.client import LLMError

    retries = call.parse_retries if call.parse_retries is not None else parse_retries
    raw: str | None = None
    reason, kind = "no answer", "parse"
    for _ in range(retries + 1):
        try:
            if call.messages is not None:
                completion = await client.chat(call.messages, max_tokens=call.max_tokens,
                                               temperature=call.temperature, **call.options)
            else:
                completion = await client.complete(call.prompt or "", max_tokens=call.max_tokens,
                                                   temperature=call.temperature, **call.options)
        except LLMError as error:
            if error.fatal:
                raise
            cost.attempts += error.attempts
            raise RowFailed(str(error), error.kind, raw) from None
        cost.add(completion)
        raw = completion.text
        try:
            value = call.parse(completion)
        except ParseFailure as failure:
            reason, kind = str(failure) or "unparseable", failure.kind
            raw = completion.text if failure.raw is None else failure.raw
            continue
        if isinstance(value, Reading):
            return Reading(value.value, completion.text if value.raw is None else value.raw)
        return Reading(value, completion.text)
    raise RowFailed(f"parse failure after {retries + 1} answers: {reason}", kind, raw)


async def ask_or_fail(client: Any, call: Call, parse_retries: int, cost: RowCost) -> Reading:
    """:func:`ask`; when the call ``may_fail``, its failure as a Reading instead."""
    try:
        return await ask(client, call, parse_retries, cost)
    except RowFailed as failed:
        if not call.may_fail:
            raise
        return Reading(None, failed.raw, failed.error, failed.kind)


class LLMRowStage(LLMStage):
    """An LLM stage whose rows each come from a :meth:`conversation`; the loop is the
    engine's. Its schema holds ``raw`` (the last answer) and the LLM cost columns."""

    @property
    def parse_retries(self) -> int:
        return int(getattr(self.section, "parse_retries", 2))

    @abc.abstractmethod
    def conversation(self, row: dict[str, Any]) -> Conversation:
        """Yield calls for ``row``, receive each reading, return the row's own fields."""

    def carried(self, row: dict[str, Any]) -> dict[str, Any]:
        """Fields of the output row taken from the input row, failed or not."""
        return {}

    def open(self) -> LLMRowWorker:
        return LLMRowWorker(self)


class LLMRowWorker(AsyncBatchWorker):
    """Every row of a batch concurrently (the client's semaphore caps requests in flight);
    one output row per input row, in input order."""

    stage: LLMRowStage

    async def aprocess(self, rows: pa.Table, client: Any) -> pa.Table:
        """``client``: the stage's first endpoint's; the others' share its cap on requests
        in flight (DEITA's two scorer models on one server)."""
        clients = {None: client, client.model: client}
        async with contextlib.AsyncExitStack() as stack:
            for endpoint in self.stage.endpoints()[1:]:
                clients[endpoint.model] = await stack.enter_async_context(
                    self.stage.client(endpoint, sharing=client))
            made = await asyncio.gather(*(self.row(r, clients) for r in rows.to_pylist()))
        return rows_table(made, self.stage.schema)

    async def row(self, row: dict[str, Any], clients: dict[str | None, Any]) -> dict[str, Any]:
        stage = self.stage
        out = await converse(stage.conversation(row), clients, stage.parse_retries,
                             {**stage.row_defaults(), **stage.carried(row), "id": row["id"]})
        if "raw" not in stage.schema.names:
            out.pop("raw")
        return out


async def converse(steps: Conversation, clients: Mapping[str | None, Any], parse_retries: int,
                   out: dict[str, Any]) -> dict[str, Any]:
    """Drive one row's conversation to its output row (``out``: the fields it starts with):
    ok with what it returned, or failed with the error; its cost summed over every call.
    A fatal client error is raised. ``clients``: by model, None naming the first."""
    cost = RowCost()
    out = {**out, "raw": None}
    last: Reading | None = None
    try:
        step = next(steps)
        while True:
            try:
                if isinstance(step, list):
                    readings = list(await asyncio.gather(*(
                        ask_or_fail(clients[c.model], c, parse_retries, cost) for c in step)))
                    last = readings[-1] if readings else last
                    reply: Any = readings
                else:
                    last = reply = await ask_or_fail(clients[step.model], step, parse_retries,
                                                     cost)
            except RowFailed as failed:
                out.update(status="failed", error=failed.error[:2000], error_kind=failed.kind,
                           raw=failed.raw)
                out.update(made_so_far(steps, failed))
                break
            step = steps.send(reply)
    except StopIteration as done:  # the conversation may set its own status and error
        out.update({"raw": last.raw if last else None, "status": "ok", **(done.value or {})})
    finally:
        steps.close()
    out.update(cost.as_row())
    return out


def made_so_far(steps: Conversation, failed: RowFailed) -> dict[str, Any]:
    """What a conversation that catches the failure says it made before it (EVOL's versions);
    nothing when it does not catch it."""
    try:
        steps.throw(failed)
    except StopIteration as done:
        return {k: v for k, v in (done.value or {}).items()
                if k not in ("status", "error", "error_kind", "raw")}
    except RowFailed:
        return {}
    return {}
