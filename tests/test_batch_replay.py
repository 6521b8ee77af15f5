"""The Batch API path's parts without Prefect or Ray: the replay client sends exactly the body
the synchronous client sends and reads answers with its code; custom ids never repeat; input
files keep the provider's limits; a driver killed right after creating a batch finds it again.
Real loopback servers (OpenAIStub, BatchServer), no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path

import pytest

from gleaner.config import BatchAPIConfig, EndpointConfig
from gleaner.engine.batch_state import BatchState, _split, collect, prepare, submit, update
from gleaner.engine.replay import (
    ROW,
    Answer,
    BatchRequest,
    NotAnswered,
    Policy,
    ReplayClient,
    RowCalls,
)
from gleaner.llm.batches import BatchAPI
from gleaner.llm.client import LLMClient, LLMError
from gleaner.store import Store
from tests.support.batch_server import BatchServer
from tests.support.openai_server import OpenAIStub, Reply

MESSAGES = [{"role": "system", "content": "Rate."}, {"role": "user", "content": "Say {hi}."}]
TOP = [{"4": math.log(0.7), " 5": math.log(0.2), "3": math.log(0.1)}]


def answer(body: dict) -> Reply:
    return Reply(content="4", top_logprobs=TOP, prompt_tokens=17, completion_tokens=1)


def calls(client) -> list:
    """The three calls a rater, a scorer and the judge make."""

    async def run() -> list:
        return [await client.chat(MESSAGES, max_tokens=256),
                await client.chat(MESSAGES, max_tokens=1, logprobs=True, top_logprobs=20),
                await client.complete("Query: x\n##Complexity: ", max_tokens=1, logprobs=5,
                                      extra_body={"grammar": "root ::= [1-6]"})]

    return run


def replay(client: ReplayClient, example: str = "ex") -> tuple[RowCalls, list | None]:
    async def run() -> tuple[RowCalls, list | None]:
        row = RowCalls(example)
        ROW.set(row)
        try:
            out = await calls(client)()
        except NotAnswered:
            return row, None
        return row, out

    return asyncio.run(run())


def test_replay_sends_the_sync_body_and_reads_answers_with_the_sync_code() -> None:
    with OpenAIStub(answer) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="m", max_retries=0)

        async def sync() -> list:
            async with LLMClient(endpoint) as client:
                return await calls(client)()

        live = asyncio.run(sync())
        sent = list(stub.requests)
        urls = ["/v1/chat/completions", "/v1/chat/completions", "/v1/completions"]
        bodies = [stub._body(b, answer(b), u.endswith("chat/completions"))
                  for b, u in zip(sent, urls, strict=True)]
    # the replay stops at each unanswered call; answered, it goes on to the next one
    answers: dict[str, list[Answer]] = {}
    client = ReplayClient(endpoint, answers, Policy())
    recorded: list[BatchRequest] = []
    for _ in range(3):
        row, out = replay(client)
        assert out is None and len(row.pending) == 1
        request = row.pending[0]
        recorded.append(request)
        answers[request.key] = [Answer(request.custom_id, 200,
                                       json.dumps(bodies[len(recorded) - 1]))]
    assert [r.body for r in recorded] == sent  # byte for byte what the SDK sent
    assert [r.url for r in recorded] == urls
    row, out = replay(client)
    assert out is not None and row.requests == 3 and not row.pending
    for got, want in zip(out, live, strict=True):
        assert (got.text, got.top_logprobs, got.prompt_tokens, got.completion_tokens) == (
            want.text, want.top_logprobs, want.prompt_tokens, want.completion_tokens)


def _client(lines: dict[str, list[Answer]], policy: Policy, live=None) -> ReplayClient:
    return ReplayClient(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"), lines,
                        policy, live, sent={k: len(v) for k, v in lines.items()})


def chat_requests(endpoint: EndpointConfig, count: int) -> list[BatchRequest]:
    """``count`` one-token chat requests, one per example ``e0``, ``e1``, ..."""
    return [BatchRequest(f"e{i}-{i:016d}", f"e{i}", 0, "/v1/chat/completions",
                         {"model": "m", "messages": MESSAGES, "max_tokens": 1}, endpoint)
            for i in range(count)]


def _first_key(example: str = "ex") -> str:
    row, _ = replay(_client({}, Policy()), example)
    return row.pending[0].key


def test_a_repeated_body_is_a_new_request_and_a_lost_one_gets_a_new_custom_id() -> None:
    key = _first_key()
    assert key.startswith("ex-") and len(key) == len("ex-") + 16

    async def twice(client: ReplayClient) -> list[str]:
        row = RowCalls("ex")
        ROW.set(row)
        for _ in range(2):
            with contextlib.suppress(NotAnswered):
                await client.chat(MESSAGES, max_tokens=256)
        return [r.custom_id for r in row.pending]

    assert asyncio.run(twice(_client({}, Policy()))) == [key, f"{key}-1"]  # a parse retry
    expired = {key: [Answer(key, None, None, "batch_expired", "expired")]}
    assert asyncio.run(twice(_client(expired, Policy())))[0] == f"{key}~1"  # sent again


def test_what_a_lost_or_refused_request_becomes() -> None:
    key = _first_key()
    lost = [Answer(key, None, None, "batch_expired", "the batch expired"),
            Answer(f"{key}~1", 500, '{"error": {"message": "overloaded"}}')]

    async def ask(client: ReplayClient) -> str:
        ROW.set(RowCalls("ex"))
        try:
            await client.chat(MESSAGES, max_tokens=256)
        except NotAnswered:
            return "pending"
        except LLMError as error:
            return f"{error.kind} fatal={error.fatal}: {error}"
        return "answered"

    # two losses, resubmits=1: the row fails with the provider's reason
    failed = asyncio.run(ask(_client({key: lost}, Policy(resubmits=1))))
    assert failed.startswith("batch_transient fatal=False") and "overloaded" in failed
    assert asyncio.run(ask(_client({key: lost}, Policy(resubmits=2)))) == "pending"
    rejected = [Answer(key, 401, '{"error": {"message": "Incorrect API key"}}')]
    assert asyncio.run(ask(_client({key: rejected}, Policy()))).startswith(
        "rejected_key fatal=True")
    bad = [Answer(key, 400, '{"error": {"message": "max_tokens is too large"}}')]
    assert "http_error fatal=False" in asyncio.run(ask(_client({key: bad}, Policy())))
    capped = asyncio.run(ask(_client({}, Policy(can_submit=False))))
    assert capped.startswith("batch_rounds")

    class Live:  # retries_via=sync: the lost request goes to the synchronous client
        async def chat(self, *args, **kwargs):
            return "live answer"

        async def aclose(self) -> None:
            return None

    client = _client({key: lost[:1]}, Policy(retries_via="sync"), live=Live)
    ROW.set(RowCalls("ex"))
    assert asyncio.run(client.chat(MESSAGES, max_tokens=256)) == "live answer"



def test_a_synchronous_retry_waits_until_no_row_of_its_batch_waits() -> None:
    """retries_via=sync: a live answer made while another row still waits for the Batch API
    would be thrown away with the batch and paid again next round, so it is held back."""
    import pyarrow as pa

    from gleaner.engine.replay import Pending, ReplayWorker
    from gleaner.engine.stage import AsyncBatchWorker

    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m")
    live_calls: list[str] = []
    toy_schema = pa.schema([("id", pa.string()), ("text", pa.string())])

    class Live:
        async def chat(self, messages, **kwargs):
            live_calls.append(messages[-1]["content"])
            return "live answer"

        async def aclose(self) -> None:
            return None

    class Worker(AsyncBatchWorker):
        async def aprocess(self, rows: pa.Table, client) -> pa.Table:
            answer = await client.chat(MESSAGES, max_tokens=256)
            text = getattr(answer, "text", answer)
            return pa.table({"id": rows.column("id"), "text": [text]}, schema=toy_schema)

    class Stage:
        name, schema, client_factory = "toy", toy_schema, None

        def open(self):
            return Worker(self)

        def client(self, endpoint_=None):
            return self.client_factory(endpoint)

        def live_client(self, endpoint_):
            return Live()

    lost_key, waiting_key = _first_key("a"), _first_key("b")
    lost = {lost_key: [Answer(lost_key, None, None, "batch_expired", "the batch expired")]}
    rows = pa.table({"id": ["a", "b"]})
    policy = Policy(retries_via="sync")

    def answers(got: dict) -> ReplayWorker:
        return ReplayWorker(Stage(), lambda ids: (got, {k: len(v) for k, v in got.items()}),
                            policy)

    with pytest.raises(Pending) as pending:  # b still waits: a's live call is held back
        answers(lost).process(rows)
    assert [r.key for r in pending.value.requests] == [waiting_key] and live_calls == []
    body = json.dumps({
        "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "4"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    done = answers({**lost, waiting_key: [Answer(waiting_key, 200, body)]}).process(rows)
    assert done.column("text").to_pylist() == ["live answer", "4"]
    assert len(live_calls) == 1  # sent once, when nothing else of the batch waited


def test_input_files_keep_the_providers_limits() -> None:
    endpoint = EndpointConfig(base_url="http://x/v1", model="m")
    requests = [BatchRequest(f"e{i}-{i:016d}", f"e{i}", 0, "/v1/chat/completions",
                             {"model": "m", "messages": [{"role": "user", "content": "x" * 100}]},
                             endpoint) for i in range(10)]
    line = len(requests[0].line())
    by_count = list(_split(requests, BatchAPIConfig(max_requests_per_file=4)))
    assert [len(c) for c, _ in by_count] == [4, 4, 2]
    by_bytes = list(_split(requests, BatchAPIConfig(max_file_bytes=max(1000, 3 * line))))
    assert all(len(data) <= max(1000, 3 * line) for _, data in by_bytes)
    assert sum(len(c) for c, _ in by_bytes) == 10
    assert b"".join(d for _, d in by_bytes).count(b"\n") == 10


def test_a_driver_killed_after_creating_a_batch_finds_it_instead_of_paying_twice(
        tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with BatchServer(answer, complete_after_s=0.0) as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="m", max_retries=0)
        state = BatchState("r", "rate")
        requests = chat_requests(endpoint, 5)
        [record] = prepare(store, state, requests, BatchAPIConfig())
        api = BatchAPI(endpoint)
        # what the killed driver did: upload, mark "creating", create, and die before saving
        record.input_file_id = api.upload("x.jsonl", store.read_bytes(
            f"{store.run_path('r', 'rate')}/_batch/requests/00000.jsonl"))
        record.status = "creating"
        state.save(store)
        api.create(record.input_file_id, record.url, "24h", {})
        state = BatchState.load(store, "r", "rate")
        submit(store, state, state.batches[0], api, "24h")
        assert server.calls["batches.create"] == 1 and state.batches[0].batch_id == "batch_00000"
        record = state.batches[0]
        while record.status not in ("completed",):
            update(record, api.retrieve(record.batch_id))
        collect(store, state, record, api)
        assert (record.answered, record.lost) == (5, 0)
        assert max(server.submitted.values()) == 1 and len(server.submitted) == 5
        api.close()


@pytest.mark.parametrize("status", ["expired", "cancelled"])
def test_a_batch_that_ended_half_done_loses_the_rest(tmp_path: Path, status: str) -> None:
    store = Store(str(tmp_path / "store"))
    with BatchServer(answer, complete_after_s=0.0) as server:
        server.expire = {0}
        server.expired_rest = "missing"  # the rest is nowhere: neither output nor error file
        server.shuffle = True
        endpoint = EndpointConfig(base_url=server.base_url, model="m", max_retries=0)
        state = BatchState("r", "rate")
        requests = chat_requests(endpoint, 10)
        [record] = prepare(store, state, requests, BatchAPIConfig())
        api = BatchAPI(endpoint)
        submit(store, state, record, api, "24h")
        if status == "cancelled":
            update(record, api.cancel(record.batch_id))
        while record.status not in ("expired", "cancelled"):
            update(record, api.retrieve(record.batch_id))
        collect(store, state, record, api)
        api.close()
    assert (record.status, record.answered, record.lost) == (status, 5, 5)
    answers = store.dataset([f"{store.run_path('r', 'rate')}/_batch/answers/00000.parquet"]
                            ).to_table().to_pylist()
    assert len(answers) == 10
    assert {a["error_code"] for a in answers if a["status_code"] is None} == {f"batch_{status}"}


def test_a_missing_file_or_batch_is_named_as_such_not_as_a_missing_model() -> None:
    with BatchServer(lambda body: Reply("4")) as server:
        api = BatchAPI(EndpointConfig(base_url=server.base_url, model="m"))
        try:
            with pytest.raises(LLMError) as gone:
                api.retrieve("batch_nobody_made")
            with pytest.raises(LLMError) as no_file:
                list(api.lines("file-nobody-made"))
        finally:
            api.close()
    for error, what in ((gone.value, "retrieve"), (no_file.value, "download")):
        assert error.kind == "batch_not_found" and error.fatal
        assert f"Batch API {what}:" in str(error) and "no such object" in str(error)
        assert "has no model" not in str(error)


def test_a_rejected_batch_left_uncollected_is_collected_not_created_again(
        tmp_path: Path) -> None:
    from gleaner.engine.batch_api import _advance

    store = Store(str(tmp_path / "store"))
    with BatchServer(answer, complete_after_s=0.0) as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="m", max_retries=0)
        state = BatchState("r", "rate")
        requests = chat_requests(endpoint, 3)
        [record] = prepare(store, state, requests, BatchAPIConfig())
        # what a driver killed after the provider refused the file left behind
        record.status, record.errors = "rejected", ["HTTP 400: the file is too large"]
        state.save(store)
        state = BatchState.load(store, "r", "rate")
        api = BatchAPI(endpoint)
        try:
            _advance(store, state, state.batches[0], api, BatchAPIConfig())
        finally:
            api.close()
        record = state.batches[0]
    assert server.calls.get("batches.create", 0) == 0 and server.calls.get("files.create", 0) == 0
    assert (record.answered, record.lost) == (0, 3) and not state.uncollected()
