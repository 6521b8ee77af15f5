"""The offline llama.cpp server proves itself, and when its process dies the error says so: the
signal, what it means, the log's last lines and path; in the rate and the judge paths, never
as a network problem. A configured endpoint that is down or answers an error says that."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from gleaner.config import EndpointConfig, GleanerConfig
from gleaner.engine import FatalStageError
from gleaner.llm.client import LLMClient, LLMError
from gleaner.llm.local_server import LocalServerError, local_llm_server
from gleaner.llm.offline import offline_endpoints
from gleaner.runtime import free_port
from gleaner.schema import examples_to_table
from gleaner.store import Store
from tests.support.faults import examples
from tests.support.openai_server import OpenAIStub, Reply

pytestmark = pytest.mark.slow  # each test starts llama.cpp with SmolLM2 (a few seconds)


def wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            time.sleep(0.5)  # the watcher writes the exit down
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not die")


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGKILL])
def test_a_server_killed_before_it_is_ready_is_reported_with_its_signal(sig) -> None:
    with pytest.raises(LocalServerError) as caught, \
            local_llm_server(on_spawn=lambda process: os.kill(process.pid, sig)):
        pass
    message = str(caught.value)
    assert f"was killed by {sig.name} before it answered" in message
    assert "server log: " in message and Path(message.split("server log: ")[1].split()[0]).exists()
    if sig == signal.SIGILL:
        assert "uses CPU instructions this machine does not allow" in message
        assert "infra/install.sh" in message


def test_the_server_answers_a_logprobs_completion_before_its_url_is_handed_out() -> None:
    import httpx

    with local_llm_server() as server:
        log = server.log_path.read_text()
        assert log.count("POST /v1/chat/completions") == 1  # the self-test, already done
        assert httpx.get(f"{server.base_url}/models", timeout=10).status_code == 200
        state = json.loads(server.state_path.read_text())
        assert state["pid"] == server.pid and "returncode" not in state
    assert json.loads(server.state_path.read_text())["stopped"] is True


def test_rate_path_reports_a_dead_local_server(prefect_api, ray_local, tmp_path) -> None:
    from gleaner.flows.rate_flow import rate_flow
    from gleaner.tasks.rate.prompt import build_prompt
    from gleaner.tasks.rate.stage import rate_batch

    store = Store(str(tmp_path / "store"))
    store.write_part("dead", "ingest", 0, examples_to_table(examples(range(6))))
    config = GleanerConfig().with_overrides({"store.url": store.url})
    with offline_endpoints(config, "rater") as live:
        pid = json.loads(Path(live.rate.endpoint.local_server).read_text())["pid"]
        os.kill(pid, signal.SIGILL)
        wait_dead(pid)
        with pytest.raises(FatalStageError) as caught:  # the stage: its probe finds it dead
            rate_flow(run_id="dead", config=live)

        async def a_worker_batch() -> None:  # a worker's batch: the same cause, fatal
            async with LLMClient(live.rate.endpoint) as client:
                await rate_batch([e.to_row() for e in examples(range(2))], client,
                                 build_prompt(), "score-only")

        with pytest.raises(LLMError) as in_worker:
            asyncio.run(a_worker_batch())
    for error in (caught.value, in_worker.value):
        message = str(error)
        assert "the llama.cpp server gleaner started" in message
        assert "was killed by SIGILL while in use" in message and "infra/install.sh" in message
        assert "last lines of the log:" in message and "connection" not in message.lower()
    assert in_worker.value.kind == "server_died" and in_worker.value.fatal
    assert not store.has_stage("dead", "rate")


def test_judge_path_reports_a_dead_local_server(prefect_api, ray_local, tmp_path) -> None:
    from gleaner.flows.evaluate_flow import evaluate_flow

    answers = {}
    for side in ("a", "b"):
        path = tmp_path / f"{side}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": f"{side} {i}"}) + "\n"
                                for i in range(3)))
        answers[side] = str(path)
    config = GleanerConfig().with_overrides({"store.url": str(tmp_path / "store")})
    with offline_endpoints(config, "judge") as live:
        pid = json.loads(Path(live.evaluate.endpoint.local_server).read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        with pytest.raises(FatalStageError) as caught:
            evaluate_flow(run_id="dead-judge", config=live, answers_a=answers["a"],
                          answers_b=answers["b"])
    message = str(caught.value)
    assert "the llama.cpp server gleaner started" in message
    assert "was killed by SIGKILL while in use" in message and "server log:" in message


def test_a_configured_endpoint_that_is_down_or_answers_an_error_says_which() -> None:
    async def ask(endpoint: EndpointConfig) -> None:
        async with LLMClient(endpoint) as client:
            await client.chat([{"role": "user", "content": "hi"}], max_tokens=1)

    down = EndpointConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m",
                          max_retries=0)
    with pytest.raises(LLMError) as unreachable:
        asyncio.run(ask(down))
    assert unreachable.value.kind == "unreachable" and "is unreachable" in str(unreachable.value)
    assert "llama.cpp" not in str(unreachable.value)
    with OpenAIStub(lambda body: Reply(status=400, error_message="bad request body")) as stub, \
            pytest.raises(LLMError) as answered:
        asyncio.run(ask(EndpointConfig(base_url=stub.base_url, model="m", max_retries=0)))
    assert answered.value.kind == "http_error" and not answered.value.fatal
    assert "answered with an error" in str(answered.value) and "bad request body" in str(
        answered.value)
