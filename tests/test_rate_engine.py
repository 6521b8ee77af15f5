"""Rating on the engine: conversations rated in context, a logprobs fallback that reruns
cleanly, a rejected key that stops after one request, the failure budget, and two runners
that never send an example twice. Real Prefect API, real Ray, real HTTP servers on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.flows.cli import app
from gleaner.flows.rate_flow import run_rate
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from gleaner.tasks.rate.prompt import CONTEXT_HEADER, FINAL_HEADER, build_prompt
from tests.support.faults import FaultyRater, example_key, examples
from tests.support.openai_server import OpenAIStub, Reply, request_text

ROOT = Path(__file__).resolve().parents[1]
# The prompt of gleaner's single-turn rating before conversations were rated in context,
# pinned: its template hash (the cache key's prompt part) and the first 50 Alpaca prompts.
PROMPT_VERSION = "15a757d77792"
FIRST_50_ALPACA_PROMPTS_SHA256 = "daddfd0dfa102a4b2ddb148ddb25b650b6dfa90222980b66381aea45a245f2f5"


def config_for(store: Store, url: str, **overrides) -> GleanerConfig:
    return GleanerConfig().with_overrides({
        "store.url": store.url, "rate.endpoint.base_url": url, "rate.endpoint.model": "stub",
        "rate.endpoint.max_retries": 0, "rate.mode": "explain",
        "rate.resources.batch_size": 50, "rate.resources.retry_delay_s": 0, **overrides})


def test_single_turn_prompts_are_the_same_as_before(shared_data: Path) -> None:
    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:50]
    prompt = build_prompt("accuracy")
    messages = [prompt.messages(Example("s", i, r["instruction"], r["input"], r["output"])
                                .to_row()) for i, r in enumerate(rows)]
    assert prompt.version == PROMPT_VERSION
    digest = hashlib.sha256(json.dumps(messages).encode()).hexdigest()
    assert digest == FIRST_50_ALPACA_PROMPTS_SHA256
    assert not any(CONTEXT_HEADER in m[1]["content"] for m in messages)


def test_lima_conversations_reach_the_rater_with_every_earlier_turn(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.tasks.ingest.ingest import run_ingest

    store = Store(str(tmp_path / "store"))
    with OpenAIStub(lambda body: "4\nFine.") as stub:
        config = config_for(store, stub.base_url, **{"rate.resources.batch_size": 256,
                                                     "rate.resources.concurrency": 32})
        run_ingest([str(shared_data / "lima" / "lima.json")], store, "lima", config)
        summary = run_rate(config, "lima")
        bodies = list(stub.requests)
    assert summary["rated"] == summary["read"] == 1029
    pool = store.read_stage("lima", "ingest").to_pylist()
    multi = [r for r in pool if len(r["conversation"]) > 2]
    assert len(multi) == 29
    users = [b["messages"][1]["content"] for b in bodies]
    for example in multi:
        *earlier, final_user, final_answer = example["conversation"]
        [text] = [u for u in users if final_answer["content"] in u and
                  f"{FINAL_HEADER}\n{example['instruction']}" in u]
        position = text.index(CONTEXT_HEADER)
        for turn in earlier:  # every earlier turn, in order, before the final instruction
            label = {"user": "User", "assistant": "Assistant", "system": "System"}[turn["role"]]
            position = text.index(f"{label}: {turn['content']}", position)
        assert position < text.index(FINAL_HEADER)
    single = [u for u in users if CONTEXT_HEADER not in u]
    assert len(single) == 1000 + 1  # the single-turn examples, and the probe


def test_a_score_only_run_that_fell_back_to_explain_reruns_cleanly(
        prefect_api, ray_local, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.write_part("fb", "ingest", 0, examples_to_table(examples([f"f{i}" for i in range(20)])))
    rater = FaultyRater(logprobs=False)  # an endpoint without logprobs
    with OpenAIStub(rater) as stub:
        config = config_for(store, stub.base_url, **{"rate.mode": "score-only",
                                                     "rate.resources.batch_size": 5})
        first = run_rate(config, "fb")
        assert first["mode"] == "explain" and "falls back to explain" in first["mode_note"]
        assert first["rated"] == 20 and first["settings"]["mode"] == "explain"
        sent = stub.count()
        again = run_rate(config, "fb")  # finished: no probe, no request, no plan mismatch
        assert stub.count() == sent and again["rated"] == 20 and again["mode"] == "explain"
        store.fs.rm(store.part_paths(store.stage_path("fb", "rate"))[3])
        resumed = run_rate(config.with_overrides({"rate.cache": False}), "fb")
        assert resumed["rated"] == 20 and stub.count() == sent + 1 + 5  # probe + lost batch


def _rate_args(store: Store, url: str, run_id: str, *extra: str) -> list[str]:
    return ["rate", "--run-id", run_id, "--store", store.url, "--base-url", url, "--model", "stub",
            "--mode", "explain", "--batch-size", "10", "--json", *extra]


def _cli(store: Store, url: str, run_id: str, env: dict[str, str], *extra: str
         ) -> subprocess.Popen:
    command = [sys.executable, "-m", "gleaner.flows.cli", *_rate_args(store, url, run_id, *extra)]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _env(prefect_api: str, **extra: str) -> dict[str, str]:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT), **extra}


def test_a_rejected_key_stops_the_stage_after_the_first_request(
        prefect_api, ray_local, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.write_part("key", "ingest", 0, examples_to_table(examples(range(300))))

    def checks_the_key(body: dict) -> Reply:
        return Reply(status=401, error_message="Incorrect API key provided")

    with OpenAIStub(checks_the_key) as stub:
        process = _cli(store, stub.base_url, "key",
                       _env(prefect_api, OPENAI_API_KEY="sk-wrong-0123456789abcdef"))
        out, err = process.communicate(timeout=300)
        assert stub.count() == 1  # the probe; no batch was submitted
    assert process.returncode == 1
    assert "rejected the API key (from $OPENAI_API_KEY)" in err and "HTTP 401" in err
    assert "sk-wrong-0123456789abcdef" not in err + out
    assert not store.has_stage("key", "rate")


def test_a_run_over_its_failure_budget_ends_failed(prefect_api, ray_local, tmp_path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    store = Store(str(tmp_path / "store"))
    keys = [f"b{i}" for i in range(40)]
    store.write_part("budget", "ingest", 0, examples_to_table(examples(keys)))
    bad = set(keys[:8])  # 20 % of the examples get an error answer

    def sometimes_400(body: dict) -> Reply:
        return Reply(status=400) if example_key(body) in bad else Reply("4\nGood.")

    with OpenAIStub(sometimes_400) as stub:
        process = _cli(store, stub.base_url, "budget", _env(prefect_api))
        out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-2000:]
    assert "8 of 40 rows failed (20.0%), more than the failure budget of 5.0%" in err
    rated = store.read_stage("budget", "rate").to_pylist()
    assert len(rated) == 40 and sum(r["status"] == "failed" for r in rated) == 8

    async def state() -> str:
        async with get_client() as client:
            [run] = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["rate-budget"])))
            return run.state.type.value

    import asyncio

    assert asyncio.run(state()) == "FAILED"


def test_two_runners_on_one_run_never_send_an_example_twice(
        prefect_api, ray_local, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    keys = [f"t{i}" for i in range(120)]
    store.write_part("twice", "ingest", 0, examples_to_table(examples(keys)))
    per_example: Counter[str] = Counter()
    lock = threading.Lock()
    refused = threading.Event()

    def slow_rater(body: dict) -> Reply:
        key = example_key(body)
        if key:
            with lock:
                per_example[key] += 1
        # slow until the second runner has refused: the first one is still rating (and holds
        # the lease) when the second one comes; then the rest at once
        return Reply(f"3\n{request_text(body)[:10]}", delay_s=0 if refused.is_set() else 0.2)

    with OpenAIStub(slow_rater) as stub:
        # the first runner is its own process; the second comes once the first holds the
        # lease, through the same CLI in this process (another pid, same host)
        first = _cli(store, stub.base_url, "twice", _env(prefect_api), "--concurrency", "2")
        lease, deadline = layout.lease_path(store, "twice", "rate"), time.monotonic() + 240
        while not store.exists(lease):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first runner never took the lease"
            time.sleep(0.05)
        second = CliRunner().invoke(app, _rate_args(store, stub.base_url, "twice",
                                                    "--concurrency", "2"))
        refused.set()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.exit_code == 1, (second.output[-2000:], second.exception)
    # the one that came second refuses, naming the holder
    assert "is being run by" in second.output and f"pid {first.pid}" in second.output
    assert set(per_example) == set(keys) and max(per_example.values()) == 1
    assert json.loads(out.strip().splitlines()[-1])["rated"] == 120


def test_a_dead_runners_lease_is_taken_over(tmp_path: Path) -> None:
    from gleaner.engine.lease import Lease

    store = Store(str(tmp_path / "store"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = Lease(store, "r", "rate")
    lease.owner["pid"] = dead.pid  # a holder of this host that no longer runs
    lease.acquire()
    lease._stop.set()
    taken = Lease(store, "r", "rate")
    taken.acquire()  # no wait for the ttl: the holder's process is gone
    taken.release()
    assert not store.exists(taken.path)


def test_an_empty_pool_rates_and_selects_nothing_with_every_count(prefect_api, ray_local,
                                                                  tmp_path: Path) -> None:
    """A generator that kept nothing leaves an empty ingest: the stages still report."""
    from gleaner.flows.select_flow import run_select

    store = Store(str(tmp_path / "store"))
    store.write_part("empty", "ingest", 0, examples_to_table([]))
    with OpenAIStub(lambda body: "4\nFine.") as stub:
        config = config_for(store, stub.base_url)
        summary = run_rate(config, "empty")
        assert stub.count() == 0  # nothing pending: not even the probe
    assert summary["read"] == summary["rated"] == summary["kept"] == 0
    assert sum(summary["histogram"].values()) == 0
    selected = run_select(store, "empty", config.with_overrides({"select.selector": "topk"}))
    assert selected["selected"] == 0 and selected["examples"] == 0
