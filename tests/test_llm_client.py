"""The shared LLM client against a real loopback HTTP server, and the cluster-wide rate limit."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from gleaner.config import EndpointConfig
from gleaner.llm.client import SCORE_TOKENS_1_6, LLMClient, LLMError, expected_score
from gleaner.llm.ratelimit import LocalRateLimiter, TokenBucket
from tests.support.openai_server import OpenAIStub, Reply

SECRET = "sk-test-DO-NOT-LEAK-1234567890abcdef"


def endpoint(stub: OpenAIStub, **overrides) -> EndpointConfig:
    values = {"base_url": stub.base_url, "model": "stub-model", "timeout_s": 5.0, "max_retries": 2}
    values.update(overrides)
    return EndpointConfig(**values)


def scripted(*replies: Reply) -> tuple[callable, list]:
    """A responder that plays replies in order, then answers '4' forever."""
    queue = list(replies)

    def responder(body):
        return queue.pop(0) if queue else Reply(content="4\nfine")

    return responder, queue


def run(coro):
    return asyncio.run(coro)


def test_429_with_retry_after_is_honoured_then_succeeds() -> None:
    responder, _ = scripted(Reply(status=429, headers={"Retry-After": "1"}))
    with OpenAIStub(responder) as stub:

        async def call():
            async with LLMClient(endpoint(stub)) as client:
                started = time.perf_counter()
                completion = await client.chat([{"role": "user", "content": "hi"}], max_tokens=8)
                return completion, time.perf_counter() - started, client.usage

        completion, elapsed, usage = run(call())
    assert completion.text.startswith("4")
    assert completion.attempts == 2 and usage.requests == 2
    assert elapsed >= 0.9  # waited as long as the server asked


def test_5xx_and_broken_json_are_retried_and_counted() -> None:
    responder, _ = scripted(
        Reply(status=500), Reply(raw_body='{"choices": [{"mess'), Reply(status=502)
    )
    with OpenAIStub(responder) as stub:

        async def call():
            async with LLMClient(endpoint(stub), backoff_s=0.01) as client:
                completion = await client.chat([{"role": "user", "content": "x"}], max_tokens=4)
                return completion, client.usage

        completion, usage = run(call())
        assert stub.count() == 4
    assert completion.attempts == 4 and usage.requests == 4 and usage.calls == 1
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0


@pytest.mark.parametrize("raw_body", [
    '{"choices": []}',
    '{"object": "error"}',
    '{"choices": [{"message": {"content": 5}}]}',
    '{"choices": [{"message": {"content": "4"}, "logprobs": {"content": [{"logprob": -1}]}}]}',
    '[1, 2]',
])
def test_json_that_is_no_completion_is_retried_then_fails_as_malformed(raw_body) -> None:
    with OpenAIStub(lambda body: Reply(raw_body=raw_body)) as stub:

        async def call():
            async with LLMClient(endpoint(stub), backoff_s=0.01, body_retries=1) as client:
                await client.chat([{"role": "user", "content": "x"}], max_tokens=4)

        with pytest.raises(LLMError) as caught:
            run(call())
        assert stub.count() == 2  # the answer, then one body retry
    assert caught.value.kind == "transient" and caught.value.attempts == 2
    assert "malformed response" in str(caught.value) and "not a completion" in str(caught.value)


def test_the_body_sent_is_the_request_builders_and_sdk_options_reach_the_server() -> None:
    """What goes over the wire is request_body's JSON (the Batch API files hold the same):
    extra_body merged in, extra_headers and extra_query as HTTP, nothing else added."""
    from gleaner.llm.client import chat_request, request_body

    with OpenAIStub(lambda body: Reply(content="4")) as stub:
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
        extra = {"extra_body": {"grammar": "root ::= [0-9]"}, "top_p": 0.5,
                 "extra_headers": {"X-Gleaner-Test": "yes"}}

        async def call():
            async with LLMClient(endpoint(stub)) as client:
                return await client.chat(messages, max_tokens=3, logprobs=True, top_logprobs=5,
                                         **extra)

        completion = run(call())
        sent, headers = stub.requests[0], stub.request_headers[0]
    assert sent == request_body(chat_request("stub-model", messages, max_tokens=3,
                                             logprobs=True, top_logprobs=5, **extra))
    assert sent["grammar"] == "root ::= [0-9]" and "extra_body" not in sent
    assert headers["x-gleaner-test"] == "yes" and headers["authorization"].startswith("Bearer ")
    assert completion.text == "4" and completion.attempts == 1


def test_a_hang_beyond_the_timeout_fails_as_transient_after_the_sdk_retries() -> None:
    with OpenAIStub(lambda body: Reply(content="4", delay_s=2.0)) as stub:

        async def call():
            async with LLMClient(endpoint(stub, timeout_s=0.3, max_retries=1)) as client:
                await client.chat([{"role": "user", "content": "x"}], max_tokens=4)

        with pytest.raises(LLMError) as caught:
            run(call())
        assert stub.count() == 2  # the first try and one SDK retry
    assert caught.value.transient and caught.value.attempts == 2
    assert "timeout" in str(caught.value)


def test_permanent_errors_are_not_retried_and_never_show_the_key(monkeypatch) -> None:
    monkeypatch.setenv("STUB_KEY", SECRET)

    def responder(body):  # echo a key-like string the way some servers do
        return Reply(status=401)

    with OpenAIStub(responder) as stub:
        ep = endpoint(stub, api_key_env="STUB_KEY")

        async def call():
            async with LLMClient(ep) as client:
                assert SECRET not in repr(client)
                await client.chat([{"role": "user", "content": "x"}], max_tokens=4)

        with pytest.raises(LLMError) as caught:
            run(call())
        assert stub.count() == 1
    error = caught.value
    assert not error.transient and error.kind == "rejected_key" and "401" in str(error)
    assert error.fatal and "rejected the API key (from $STUB_KEY)" in str(error)
    assert SECRET not in str(error) and SECRET not in repr(error.__dict__)


def test_describe_scrubs_the_key_even_when_the_server_echoes_it(monkeypatch) -> None:
    monkeypatch.setenv("STUB_KEY", SECRET)
    with OpenAIStub(lambda body: Reply(status=400)) as stub:
        client = LLMClient(endpoint(stub, api_key_env="STUB_KEY"))
        message = client.describe(RuntimeError(f"Incorrect API key provided: {SECRET}"))
        run(client.aclose())
    assert SECRET not in message and "***" in message


def test_chat_top_logprobs_and_raw_completions_with_logprobs() -> None:
    top = [{"5": math.log(0.6), " 6": math.log(0.3), "x": math.log(0.1)}]

    def responder(body):
        return Reply(content="5", top_logprobs=top)

    with OpenAIStub(responder) as stub:

        async def call():
            async with LLMClient(endpoint(stub)) as client:
                chat = await client.chat(
                    [{"role": "user", "content": "rate"}], max_tokens=1, logprobs=True,
                    top_logprobs=5,
                )
                text = await client.complete("You are a helpful assistant. ##Quality: ",
                                             max_tokens=1, logprobs=5)
                return chat, text

        chat, text = run(call())
        bodies = list(stub.requests)
    assert bodies[0]["top_logprobs"] == 5 and bodies[0]["logprobs"] is True
    assert bodies[1]["prompt"].endswith("##Quality: ") and "messages" not in bodies[1]
    for completion in (chat, text):
        assert completion.top_logprobs is not None
        assert completion.top_logprobs[0]["5"] == pytest.approx(math.log(0.6))
        assert expected_score(completion.top_logprobs[0], SCORE_TOKENS_1_6) == pytest.approx(
            (5 * 0.6 + 6 * 0.3) / 0.9
        )


def test_concurrency_is_capped_per_client() -> None:
    in_flight = itertools.count()
    peak = {"now": 0, "max": 0}

    def responder(body):
        peak["now"] += 1
        peak["max"] = max(peak["max"], peak["now"])
        next(in_flight)
        return Reply(content="3", delay_s=0.1)

    with OpenAIStub(responder) as stub:

        async def call():
            async with LLMClient(endpoint(stub), concurrency=3) as client:
                async def one(i):
                    result = await client.chat([{"role": "user", "content": str(i)}], max_tokens=1)
                    peak["now"] -= 1
                    return result

                started = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(9)))
                return time.perf_counter() - started

        elapsed = run(call())
    assert peak["max"] <= 3
    assert elapsed >= 0.28  # 9 requests, 3 at a time, 0.1 s each


def test_token_bucket_math_with_a_fake_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(rpm=60, tpm=600, burst_s=1.0, clock=lambda: now[0])
    assert bucket.reserve(1, 5) == 0.0  # 1 req/s, 10 tok/s, burst of one second
    assert bucket.reserve(1, 5) == pytest.approx(1.0)  # request bucket in debt by 1
    now[0] = 2.0
    assert bucket.reserve(1, 0) == pytest.approx(0.0)
    assert bucket.reserve(0, 40) == pytest.approx(3.0)  # 30 tokens short at 10 tokens/s


def test_local_limiter_paces_requests() -> None:
    limiter = LocalRateLimiter(rpm=1200, tpm=None)  # 20/s, burst 20

    async def go():
        started = time.perf_counter()
        for _ in range(40):
            await limiter.acquire()
        return time.perf_counter() - started

    assert 0.9 <= run(go()) < 3.0


@pytest.mark.timing  # request times against the wall clock: run alone
def test_rate_limit_is_shared_by_all_ray_workers(ray_local) -> None:
    """Two Ray worker processes share one bucket: together they get the quota, not twice it."""
    import ray

    from gleaner.llm.ratelimit import RayRateLimiter, ensure_rate_limiter

    name = f"gleaner-ratelimit-test-{time.time_ns()}"
    handle = ensure_rate_limiter(name, rpm=600, tpm=None)  # 10/s, burst 10

    @ray.remote(num_cpus=1)
    def worker(start_at: float, n: int) -> list[float]:
        async def go():
            limiter = RayRateLimiter(name)
            await limiter.acquire(0)  # resolve the actor before the clock starts
            await asyncio.sleep(max(0.0, start_at - time.time()))
            stamps = []
            for _ in range(n):
                await limiter.acquire()
                stamps.append(time.time())
            return stamps

        return asyncio.run(go())

    start_at = time.time() + 4.0
    stamps = sorted(itertools.chain(*ray.get([worker.remote(start_at, 15) for _ in range(2)])))
    ray.kill(handle)
    assert len(stamps) == 30
    # shared: 10 at once, then 20 more at 10/s -> ~2 s; per-process limits would finish in ~0.5 s
    assert stamps[-1] - start_at >= 1.7
    assert stamps[-1] - start_at < 6.0


def test_batches_on_the_worker_loop_reuse_one_connection_pool() -> None:
    """Batches of one worker process share the endpoint's connections (TLS handshakes are
    paid once, not per batch); attempts and limiters stay per call and per client."""
    from gleaner.llm.client import run_on_worker_loop

    with OpenAIStub(lambda body: Reply(content="4", delay_s=0.05)) as stub:
        limiters = [LocalRateLimiter(6000, None), LocalRateLimiter(6000, None)]

        async def batch(limiter) -> list[int]:
            async with LLMClient(endpoint(stub), limiter=limiter, concurrency=2) as client:
                done = await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}],
                                                          max_tokens=1) for i in range(6)))
                assert client.usage.requests == 6
                return [c.attempts for c in done]

        first = run_on_worker_loop(batch(limiters[0]))
        second = run_on_worker_loop(batch(limiters[1]))
        ports = list(stub.client_ports)

        async def alone() -> None:  # outside the worker loop: a client of its own
            async with LLMClient(endpoint(stub)) as client:
                await client.chat([{"role": "user", "content": "x"}], max_tokens=1)

        run(alone())
    assert first == second == [1] * 6
    assert [limiter.pacer.acquired for limiter in limiters] == [6, 6]
    assert len(ports) == 12 and len(set(ports)) <= 2  # two connections, for both batches
    assert stub.client_ports[-1] not in set(ports)


def test_each_run_on_the_worker_loop_sees_its_callers_context_and_leaves_no_task() -> None:
    """A batch's priority (a context variable the engine sets around the batch) reaches the
    batch's requests on every run, not just the first; calls still in flight when a row
    raised are cancelled, so they cannot go on sending during the next batch."""
    from gleaner.llm.client import run_on_worker_loop
    from gleaner.llm.ratelimit import _priority, request_priority

    async def priority() -> int:
        return _priority.get()

    seen = []
    for index in (3, 1, 2):
        with request_priority(index):
            seen.append(run_on_worker_loop(priority()))
    assert seen == [3, 1, 2]

    sent: list[str] = []

    async def failing_batch() -> None:
        async def row() -> None:
            await asyncio.sleep(0.2)
            sent.append("late request")

        asyncio.ensure_future(row())
        await asyncio.sleep(0)
        raise RuntimeError("one row failed")

    with pytest.raises(RuntimeError, match="one row failed"):
        run_on_worker_loop(failing_batch())
    run_on_worker_loop(asyncio.sleep(0.4))  # the next batch on the same loop
    assert sent == []
