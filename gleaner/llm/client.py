"""An OpenAI-compatible async client wrapper shared by every stage that calls an LLM.

Layers of retry, each doing what the one below cannot:

1. the openai SDK (``max_retries``): 429 honouring ``Retry-After``, 408/409/5xx,
   timeouts and connection errors, with exponential back-off and jitter;
2. this wrapper: responses the SDK hands back but that are unusable — a body
   that is not JSON, or JSON without choices — are retried with jittered
   back-off (``body_retries``);
3. the caller (e.g. the rating stage) retries answers it cannot parse.

Every HTTP attempt first takes a slot from the optional cluster-wide rate
limiter (an httpx request hook, so the SDK's own retries are counted too) and
every call holds the per-worker concurrency semaphore. API keys never appear in
messages produced here (:func:`describe_error` scrubs them).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import json
import math
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2
import openai

from gleaner.config import EndpointConfig

SCORE_TOKENS_0_5 = tuple(str(k) for k in range(6))
SCORE_TOKENS_1_6 = tuple(str(k) for k in range(1, 7))
CHAT_PATH, COMPLETIONS_PATH = "/chat/completions", "/completions"


@dataclass
class _CallState:
    """The call running in this context: its HTTP attempts (the request hook counts them)
    and the limiter each attempt takes a slot from."""

    limiter: RateLimiter | None
    attempts: int = 0


_call: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("gleaner_llm_call",
                                                                          default=None)
# the SDK clients (connection pools) shared by the LLM clients of one worker loop
_pools: contextvars.ContextVar[dict[tuple[Any, ...], openai.AsyncOpenAI] | None] = (
    contextvars.ContextVar("gleaner_llm_pools", default=None))


async def _before_request(request: httpx2.Request) -> None:
    """Every HTTP attempt, the SDK's retries included: counted for the call that makes it,
    and paced by that call's limiter."""
    state = _call.get()
    if state is None:
        return
    state.attempts += 1
    if state.limiter is not None:
        await state.limiter.acquire(requests=1, tokens=estimate_tokens(request.content))


def run_on_worker_loop(coro: Any) -> Any:
    """Run ``coro`` on this thread's long-lived event loop, where the LLM clients share one
    connection pool per endpoint: a batch reuses the connections (TLS sessions included)
    the previous batches of this worker process opened, instead of opening its own."""
    state = getattr(_worker_loop, "state", None)
    if state is None:
        runner, pools = asyncio.Runner(), {}
        atexit.register(_close_worker_loop, runner, pools)
        _worker_loop.state = state = (runner, pools)
    runner, pools = state
    token = _pools.set(pools)
    try:  # each run in a copy of the caller's context (the batch's priority, Prefect's run)
        return runner.run(_alone(coro), context=contextvars.copy_context())
    finally:
        _pools.reset(token)


async def _alone(coro: Any) -> Any:
    """``coro``, then no task it left behind: as ``asyncio.run`` does, the calls still in
    flight when a row raised are cancelled, so they cannot go on spending the quota while
    the next batch (or this one's retry) runs on the same loop."""
    try:
        return await coro
    finally:
        current = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not current]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


_worker_loop = threading.local()


def _close_worker_loop(runner: asyncio.Runner, pools: dict[tuple[Any, ...], Any]) -> None:
    async def close() -> None:
        for client in pools.values():
            await client.close()

    with contextlib.suppress(Exception):
        runner.run(close())
        runner.close()


_KEYLIKE = re.compile(r"\b(sk|key|token)-[A-Za-z0-9_\-]{6,}")


class RateLimiter(Protocol):
    """Anything that can make a caller wait for a request slot and a token budget."""

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None: ...


class LLMError(Exception):
    """A call that failed after every retry. The message never contains the API key.

    ``kind`` names the cause: ``transient`` (429/5xx/timeouts after the SDK's retries),
    ``unreachable`` (no connection), ``http_error`` (the endpoint answered with an error),
    and the ``fatal`` ones no retry can fix for the whole run: ``rejected_key`` (401/403),
    ``no_such_model`` (404), ``server_died`` (the local server gleaner started is gone).
    """

    def __init__(self, message: str, *, attempts: int, transient: bool, kind: str,
                 fatal: bool = False):
        super().__init__(message)
        self.attempts = attempts
        self.transient = transient
        self.kind = kind
        self.fatal = fatal

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the attributes across processes
        return (_rebuild_error, (str(self), self.attempts, self.transient, self.kind, self.fatal))


def _rebuild_error(message: str, attempts: int, transient: bool, kind: str,
                   fatal: bool) -> LLMError:
    return LLMError(message, attempts=attempts, transient=transient, kind=kind, fatal=fatal)


class MalformedResponse(ValueError):
    """A 200 answer whose body cannot be used (no choices, not JSON)."""


@dataclass
class Completion:
    """One successful call: the text, per-position top logprobs, tokens and cost in time."""

    text: str
    # One {token: logprob} per generated position; None when the endpoint sent none.
    top_logprobs: list[dict[str, float]] | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    attempts: int  # HTTP requests this call took, the SDK's own retries included
    finish_reason: str | None = None


@dataclass
class Usage:
    """Running totals of one client (a worker's share of a run's cost)."""

    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed_calls: int = 0

    def add(self, completion: Completion) -> None:
        self.calls += 1
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove API keys (the configured one, and anything key-shaped) from a message."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub(lambda m: f"{m.group(1)}-***", text)


def is_transient(error: BaseException) -> bool:
    """Errors worth trying again later (rate limits, overload, network), as the SDK judges them."""
    if isinstance(error, LLMError):
        return error.transient
    if isinstance(error, openai.APIConnectionError | openai.APITimeoutError):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return isinstance(error, MalformedResponse | json.JSONDecodeError | httpx2.TransportError)


def describe_error(error: BaseException, secrets: Iterable[str] = ()) -> str:
    """A short, key-free description: type, HTTP status and the server's message."""
    if isinstance(error, openai.APIStatusError):
        message = error.message if isinstance(error.message, str) else str(error)
        text = f"HTTP {error.status_code} {type(error).__name__}: {message}"
    elif isinstance(error, openai.APITimeoutError):
        text = "timeout: the endpoint did not answer within the client timeout"
    elif isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else "unknown"
        text = f"connection error: {reason}"
    else:
        text = f"{type(error).__name__}: {error}"
    return scrub(text, secrets)[:500]


def _positions_chat(logprobs: Any) -> list[dict[str, float]] | None:
    """Chat logprobs (``{"content": [{token, logprob, top_logprobs: [...]}, ...]}``) as one
    {token: logprob} per generated position."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    positions: list[dict[str, float]] = []
    for item in content:
        top = {t["token"]: float(t["logprob"]) for t in (item.get("top_logprobs") or [])}
        top.setdefault(item["token"], float(item["logprob"]))
        positions.append(top)
    return positions


def _positions_text(logprobs: Any) -> list[dict[str, float]] | None:
    """Completions logprobs (``{"top_logprobs": [{token: logprob}, ...]}``), the same way."""
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not top:
        return None
    return [{str(k): float(v) for k, v in (position or {}).items()} for position in top]


def expected_score(top: Mapping[str, float] | None, allowed: Sequence[str]) -> float | None:
    """Sum of k * p_k over the allowed score tokens, renormalised over those tokens only.

    This is DEITA's softmax over the logits of tokens "1".."6" (and the
    AlpaGasus score-only mode over "0".."5") computed from an endpoint's
    top_logprobs: softmax over a subset equals exp(logprob) renormalised over
    that subset. Tokens may come with leading spaces (" 4"); variants of one
    digit are summed. A score token missing from the top-k contributes 0.
    None when no allowed token is present.
    """
    if not top:
        return None
    allowed_set = set(allowed)
    mass: dict[str, float] = {}
    for token, logprob in top.items():
        key = token.strip()
        if key in allowed_set and logprob is not None and math.isfinite(logprob):
            mass[key] = mass.get(key, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return sum(float(k) * p for k, p in mass.items()) / total


def estimate_tokens(body: bytes) -> int:
    """Rough tokens a request may use (prompt chars / 4 + max_tokens), for the tokens/min budget."""
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        return max(1, len(body) // 4)
    max_tokens = document.get("max_tokens") or document.get("max_completion_tokens") or 0
    return max(1, len(body) // 4 + int(max_tokens))


@dataclass
class LLMClient:
    """One endpoint + model, used as ``async with LLMClient(endpoint) as client:``."""

    endpoint: EndpointConfig
    limiter: RateLimiter | None = None
    concurrency: int | None = None
    # requests in flight counted together with another client's (two models of one server)
    shares_concurrency_with: LLMClient | None = None
    body_retries: int = 2
    backoff_s: float = 0.5
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        if not self.endpoint.base_url:
            raise ValueError(
                "LLMClient needs an endpoint base_url (None means: start the offline server)"
            )
        self.model = self.endpoint.model
        self._semaphore = (self.shares_concurrency_with._semaphore
                           if self.shares_concurrency_with is not None
                           else asyncio.Semaphore(self.concurrency or 16))
        self._api_key = self.endpoint.api_key()
        pools = _pools.get()
        key = (self.endpoint.base_url, self._api_key, self.endpoint.timeout_s,
               self.endpoint.max_retries)
        self._owns_sdk_client = pools is None or key not in pools
        if self._owns_sdk_client:
            self._openai = openai.AsyncOpenAI(
                base_url=self.endpoint.base_url,
                api_key=self._api_key,
                timeout=self.endpoint.timeout_s,
                max_retries=self.endpoint.max_retries,
                http_client=openai.DefaultAsyncHttpxClient(
                    event_hooks={"request": [_before_request]}),
            )
            if pools is not None:  # the worker loop's: it lives as long as the loop
                pools[key], self._owns_sdk_client = self._openai, False
        else:
            self._openai = pools[key]

    def __repr__(self) -> str:  # never the key
        return f"LLMClient(base_url={self.endpoint.base_url!r}, model={self.model!r})"

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_sdk_client:
            await self._openai.close()

    def describe(self, error: BaseException) -> str:
        return describe_error(error, [self._api_key])

    # ---- public calls --------------------------------------------------------
    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        **extra: Any,
    ) -> Completion:
        """A chat completion; with ``logprobs`` the per-position top_logprobs come back too.

        ``extra`` goes to the SDK as is: ``extra_body={...}`` adds fields the OpenAI API
        does not define (llama.cpp's ``grammar``), for servers that read them.
        """
        kwargs = chat_request(self.model, messages, max_tokens=max_tokens,
                              temperature=temperature, logprobs=logprobs,
                              top_logprobs=top_logprobs, **extra)
        return await self._call(CHAT_PATH, kwargs, chat=True)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: int | None = None,
        **extra: Any,
    ) -> Completion:
        """Raw-text completion (``/v1/completions``): no chat template, as DEITA's scorers need."""
        kwargs = completion_request(self.model, prompt, max_tokens=max_tokens,
                                    temperature=temperature, logprobs=logprobs, **extra)
        return await self._call(COMPLETIONS_PATH, kwargs, chat=False)

    # ---- the retry loop for what the SDK does not retry ------------------------
    async def _call(self, path: str, kwargs: dict[str, Any], *, chat: bool) -> Completion:
        """POST the request body through the SDK (its retries, back-off, errors and headers)
        and read the JSON answer as is: the SDK's per-request params transform and response
        model cost a third of a request's client CPU, and the body is already plain JSON."""
        if kwargs.get("stream"):
            raise ValueError("LLMClient reads whole answers: stream is not supported")
        call = _CallState(self.limiter)
        token = _call.set(call)
        started = time.perf_counter()
        body, options = request_body(kwargs), request_options(kwargs)
        try:
            async with self._semaphore:
                for body_try in range(self.body_retries + 1):
                    try:
                        response = await self._openai.post(path, cast_to=httpx2.Response,
                                                           body=body, options=options)
                    except openai.APIError as error:
                        self.usage.failed_calls += 1
                        raise self.classify(error, call.attempts) from None
                    try:
                        completion = read_completion(json.loads(response.content), chat,
                                                     call.attempts, started)
                    except ValueError as error:
                        # Broken JSON body, or JSON without choices: the SDK does not retry these.
                        if body_try >= self.body_retries:
                            self.usage.failed_calls += 1
                            raise LLMError(
                                f"malformed response after {call.attempts} attempts: "
                                f"{self.describe(error)}",
                                attempts=call.attempts,
                                transient=True,
                                kind="transient",
                            ) from None
                        delay = self.backoff_s * (2**body_try) * random.uniform(0.5, 1.5)
                        await asyncio.sleep(delay)
                        continue
                    self.usage.add(completion)
                    return completion
        finally:
            self.usage.requests += call.attempts
            _call.reset(token)
        raise AssertionError("unreachable")

    def classify(self, error: openai.APIError, attempts: int) -> LLMError:
        """The error with its real cause named: a dead local server is not a network problem."""
        return classify_error(self.endpoint, error, attempts)


# ---- what the client sends and how it reads answers (the Batch API path shares them) --------
def chat_request(model: str, messages: Sequence[Mapping[str, str]], *, max_tokens: int,
                 temperature: float = 0.0, logprobs: bool = False,
                 top_logprobs: int | None = None, **extra: Any) -> dict[str, Any]:
    """The SDK arguments of a chat completion (``request_body`` turns them into the JSON)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": temperature,
        **extra,
    }
    if logprobs:
        kwargs["logprobs"] = True
        if top_logprobs:
            kwargs["top_logprobs"] = top_logprobs
    return kwargs


def completion_request(model: str, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                       logprobs: int | None = None, **extra: Any) -> dict[str, Any]:
    """The SDK arguments of a raw-text completion."""
    kwargs: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        **extra,
    }
    if logprobs:
        kwargs["logprobs"] = logprobs
    return kwargs


SDK_ONLY_ARGUMENTS = ("extra_headers", "extra_query", "extra_body", "timeout")


def request_body(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body the SDK sends for these arguments (``extra_body`` merged in, as it does)."""
    body = {k: v for k, v in kwargs.items() if k not in SDK_ONLY_ARGUMENTS}
    body.update(kwargs.get("extra_body") or {})
    return body


def request_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The SDK's per-request options among these arguments (headers, query, timeout), with
    the bearer key alone as the SDK's own ``create`` sends it."""
    names = {"extra_headers": "headers", "extra_query": "params", "timeout": "timeout"}
    options = {names[k]: v for k, v in kwargs.items() if k in names}
    return {**options, "security": {"bearer_auth": True}}


def read_completion(document: Any, chat: bool, attempts: int, started: float) -> Completion:
    """A chat/text completion's JSON body (parsed) as a :class:`Completion`; a body of
    another shape raises :class:`MalformedResponse`."""
    try:
        choice = document["choices"][0]
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            positions = _positions_chat(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            positions = _positions_text(choice.get("logprobs"))
        usage = document.get("usage") or {}
        if not isinstance(text, str):
            raise TypeError(f"the answer's text is a {type(text).__name__}")
        return Completion(
            text=text,
            top_logprobs=positions,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            attempts=attempts,
            finish_reason=choice.get("finish_reason"),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        what = "no choices" if isinstance(error, KeyError | IndexError) else str(error)
        raise MalformedResponse(f"the response is not a completion ({what})") from None


def local_server_death(endpoint: EndpointConfig) -> str | None:
    if not endpoint.local_server:
        return None
    from gleaner.llm.local_server import death_report

    return death_report(endpoint.local_server)


def classify_error(endpoint: EndpointConfig, error: openai.APIError, attempts: int) -> LLMError:
    """An SDK error as an :class:`LLMError` whose kind names the real cause (and whether no
    retry can fix it for the whole run)."""
    url = endpoint.base_url
    detail = describe_error(error, [endpoint.api_key()])
    if isinstance(error, openai.APIConnectionError | openai.APITimeoutError):
        death = local_server_death(endpoint)
        if death:
            return LLMError(death, attempts=attempts, transient=False, kind="server_died",
                            fatal=True)
        what = (f"did not answer within {endpoint.timeout_s:g}s"
                if isinstance(error, openai.APITimeoutError) else "is unreachable")
        return LLMError(f"the endpoint {url} {what} ({detail})", attempts=attempts,
                        transient=True, kind="unreachable")
    status = getattr(error, "status_code", None)
    if status in (401, 403):
        return LLMError(
            f"the endpoint {url} rejected the API key (from ${endpoint.api_key_env}): "
            f"{detail}", attempts=attempts, transient=False, kind="rejected_key", fatal=True)
    if status == 404:
        return LLMError(
            f"the endpoint {url} has no model {endpoint.model!r} (or base_url is wrong): "
            f"{detail}", attempts=attempts, transient=False, kind="no_such_model", fatal=True)
    if is_transient(error):
        return LLMError(f"{detail} (from {url}, after {attempts} attempts)",
                        attempts=attempts, transient=True, kind="transient")
    return LLMError(f"the endpoint {url} answered with an error: {detail}",
                    attempts=attempts, transient=False, kind="http_error")
