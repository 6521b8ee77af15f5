"""The rating flow end to end: real Prefect API, real Ray, real HTTP rater on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.flows.cli import app
from gleaner.flows.commands.rate import format_summary
from gleaner.flows.rate_flow import run_rate
from gleaner.runs import read_run
from gleaner.schema import examples_to_table
from gleaner.store import Store
from gleaner.tasks.rate.stage import RATING_SCHEMA
from tests.support.faults import FaultyRater, example_key, examples, stable_score
from tests.support.openai_server import OpenAIStub

ROOT = Path(__file__).resolve().parents[1]


def ingest(store: Store, run_id: str, keys) -> dict[str, str]:
    """Write an ingest stage directly (the readers are tested elsewhere); returns id -> key."""
    batch = examples(keys)
    store.write_part(run_id, "ingest", 0, examples_to_table(batch))
    return {e.id: str(k) for e, k in zip(batch, keys, strict=True)}


def config_for(store: Store, stub: OpenAIStub, **overrides) -> GleanerConfig:
    values = {
        "store.url": store.url,
        "rate.endpoint.base_url": stub.base_url,
        "rate.endpoint.model": "stub-model",
        "rate.endpoint.timeout_s": 0.5,
        "rate.endpoint.max_retries": 2,
        "rate.resources.concurrency": 8,
        "rate.mode": "explain",
        "rate.resources.batch_size": 30,
        "rate.resources.retry_delay_s": 0,
    }
    values.update(overrides)
    return GleanerConfig().with_overrides(values)


def ratings(store: Store, run_id: str) -> dict[str, dict]:
    table = store.read_stage(run_id, "rate", schema=RATING_SCHEMA)
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "an example was written twice"
    return {r["id"]: r for r in rows}


def test_faults_every_example_ends_ok_or_failed_and_counts_add_up(
    prefect_api, ray_local, tmp_path, monkeypatch
) -> None:
    secret = "sk-rate-test-SECRET-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    store = Store(str(tmp_path / "store"))
    keys = [f"e{i}" for i in range(120)]
    key_of = ingest(store, "faults", keys)
    rater = FaultyRater(
        rates={"429": 0.04, "500": 0.04, "hang": 0.04, "unparseable": 0.04, "broken_json": 0.04},
        seed=3, hang_s=1.0,
    )
    with OpenAIStub(rater) as stub:
        summary = run_rate(config_for(store, stub), "faults")
    rated = ratings(store, "faults")
    assert set(rated) == set(key_of)  # none lost
    for example_id, rating in rated.items():
        key = key_of[example_id]
        assert rater.successes[key] <= 1  # none successfully rated twice
        if rating["status"] == "ok":
            assert rating["score"] == stable_score(key)
        else:
            assert rating["status"] == "failed" and rating["error"]
    assert sum(rater.faults.values()) > 20
    assert summary["read"] == 120 == summary["kept"] + summary["below"] + summary["failed"]
    assert summary["rated"] == sum(r["status"] == "ok" for r in rated.values())
    assert summary["requests"] == sum(rater.requests.values())
    scores = [r["score"] for r in rated.values() if r["status"] == "ok"]
    assert summary["kept"] == sum(s >= 4.5 for s in scores)
    assert sum(summary["histogram"].values()) == len(scores)
    assert summary["histogram"]["4.5"] == sum(s == 4.5 for s in scores)
    assert store.read_json(layout.summary_path(store, "faults", "rate"))["kept"] == summary["kept"]
    assert read_run(store, "faults")["rate"]["requests"] == summary["requests"]
    for path in (tmp_path / "store").rglob("*"):  # the key reaches no checkpoint or record
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    human = format_summary(summary)
    assert f"kept {summary['kept']} (score >= 4.5), below {summary['below']}" in human
    assert f"failed {summary['failed']}" in human and "price unknown" in human


def _query_prefect(flow_run_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort

    async def go():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                sort=FlowRunSort.ID_DESC, limit=10,
            )
            assert len(runs) == 1, [r.name for r in runs]
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=50,
            )
            states = {t.name: await client.read_task_run_states(t.id) for t in task_runs}
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                    any_=[runs[0].id])),
                sort=ArtifactSort.ID_DESC, limit=200,
            )
            return runs[0], task_runs, states, artifacts

    return asyncio.run(go())


def test_prefect_retries_a_raising_batch_and_marks_a_dead_batch_failed(
    prefect_api, ray_local, tmp_path
) -> None:
    store = Store(str(tmp_path / "store"))
    keys = [f"r{i}" for i in range(15)]  # 3 batches of 5
    key_of = ingest(store, "retries", keys)
    flaky = set(keys[0:5])  # batch 0: down on the first try only -> task raises, Prefect retries
    dead = set(keys[10:15])  # batch 2: always down -> failed after the last retry

    def down(key: str, count: int) -> int | None:
        if key in dead or (key in flaky and count == 1):
            return 503
        return None

    rater = FaultyRater(down=down)
    with OpenAIStub(rater) as stub:
        # a dead batch is a third of this tiny run: over the default failure budget
        overrides = {"rate.resources.batch_size": 5, "rate.endpoint.max_retries": 0,
                     "rate.resources.retries": 1, "rate.max_failed_share": 0.5}
        summary = run_rate(config_for(store, stub, **overrides), "retries")

    rated = ratings(store, "retries")
    assert len(rated) == 15
    for example_id, rating in rated.items():
        key = key_of[example_id]
        if key in dead:
            assert rating["status"] == "failed"
            assert rating["error_kind"] == "task" and "after 1 retries" in rating["error"]
        else:
            assert rating["status"] == "ok" and rating["score"] == stable_score(key)
    assert summary["failed"] == 5 and summary["rated"] == 10
    assert summary["failures"] == {"task": 5}

    flow_run, task_runs, states, artifacts = _query_prefect("rate-retries")
    assert flow_run.state.is_completed()  # the flow finishes
    by_name = {t.name: t for t in task_runs}
    assert set(by_name) == {"rate-batch-00000", "rate-batch-00001", "rate-batch-00002"}
    assert all(t.flow_run_id == flow_run.id for t in task_runs)  # all under one flow run
    names = [s.name for s in states["rate-batch-00000"]]
    assert "Retrying" in names and names[-1] == "Completed"  # a retry, as a state
    assert by_name["rate-batch-00000"].run_count == 2
    assert [s.name for s in states["rate-batch-00001"]][-1] == "Completed"
    assert by_name["rate-batch-00002"].state.is_failed()
    assert by_name["rate-batch-00002"].run_count == 2
    keys_seen = {a.key for a in artifacts}
    assert "rate-summary-retries" in keys_seen and "rate-progress-retries" in keys_seen
    markdown = next(a for a in artifacts if a.key == "rate-summary-retries").data
    assert "| 15 |" in markdown

    # the endpoint is back: a rerun with retry_failed rates exactly the 5 failed examples
    dead.clear()
    with OpenAIStub(rater) as stub:
        sent_before = sum(rater.requests.values())
        again = run_rate(config_for(store, stub, **overrides, **{"rate.retry_failed": True}),
                         "retries")
        # the 5 failed examples, and the one probe request every LLM stage starts with
        assert sum(rater.requests.values()) - sent_before == 5 + 1
    assert again["rated"] == 15 and again["failed"] == 0
    assert all(r["status"] == "ok" for r in ratings(store, "retries").values())


def test_cache_a_second_run_sends_only_the_new_examples(prefect_api, ray_local, tmp_path) -> None:
    store = Store(str(tmp_path / "store"))
    old = [f"c{i}" for i in range(40)]
    new = [f"n{i}" for i in range(10)]
    ingest(store, "first", old)
    ingest(store, "second", old + new)
    rater = FaultyRater()

    def rated_requests() -> int:  # rating requests (each run also sends one untagged probe)
        return stub.count(lambda body: example_key(body) is not None)

    with OpenAIStub(rater) as stub:
        # rpm set: batches go through the cluster-wide limiter actor
        config = config_for(store, stub, **{"rate.endpoint.rpm": 60000})
        first = run_rate(config, "first")
        assert rated_requests() == 40 and first["cached"] == 0
        assert stub.count() == 41 and first["requests"] == 41  # the probe is counted too
        second = run_rate(config, "second")
        assert rated_requests() == 50  # exactly the 10 new examples
        assert set(rater.keys_requested()) - {"untagged"} == set(old) | set(new)
        assert second["cached"] == 40 and second["requests"] == 10 + 1
        assert second["rated"] == 50
        rated = ratings(store, "second")
        assert sum(r["cached"] for r in rated.values()) == 40
        # another dimension is another rating: nothing reused
        ingest(store, "third", old)
        other = run_rate(config.with_overrides({"rate.dimension": "helpfulness"}), "third")
        assert other["cached"] == 0 and rated_requests() == 90
        assert other["dimension"] == "helpfulness"
        # a finished run reruns without sending anything, not even the probe
        sent = stub.count()
        assert run_rate(config, "second")["rated"] == 50 and stub.count() == sent


def _flow_runs_and_automations(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from gleaner.flow_runs import ZOMBIE_AUTOMATION

    async def go():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            return runs, await client.read_automations_by_name(ZOMBIE_AUTOMATION)

    return asyncio.run(go())


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    for child in children:  # only what this test started
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def test_resume_after_kill_9_rerates_at_most_the_batches_in_flight(
    prefect_api, ray_local, tmp_path
) -> None:
    import ray

    store = Store(str(tmp_path / "store"))
    keys = [f"k{i}" for i in range(80)]
    key_of = ingest(store, "crash", keys)
    ingest(store, "clean", keys)
    batch_size, in_flight = 10, 2  # 2 Ray CPUs, 1 CPU per batch task
    rater = FaultyRater(delay_s=0.15)
    with OpenAIStub(rater) as stub:
        env = dict(os.environ)
        env.update(RAY_ADDRESS=ray.get_runtime_context().gcs_address, PREFECT_API_URL=prefect_api,
                   PYTHONPATH=str(ROOT))
        command = [
            sys.executable, "-m", "gleaner.flows.cli", "rate", "--run-id", "crash",
            "--store", store.url,
            "--base-url", stub.base_url, "--model", "stub-model", "--mode", "explain",
            "--batch-size", str(batch_size), "--concurrency", "2", "--json",
        ]
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(store.finished_parts("crash", "rate")) < 2:
                assert process.poll() is None, process.communicate()[1].decode()[-3000:]
                assert time.monotonic() < deadline, "the rating run never got going"
                time.sleep(0.05)
        finally:
            _kill_tree(process)
        time.sleep(1.0)  # let requests already on the wire land before taking the count
        before = rater.snapshot()
        finished_at_kill = store.finished_parts("crash", "rate")
        assert len(finished_at_kill) < 8, "the run finished before it could be killed"

        # rerun the same run id through the CLI, to completion: in this process (same Ray,
        # same Prefect API as the killed one), which spares a second interpreter's start-up
        rerun = CliRunner().invoke(app, command[3:])
        assert rerun.exit_code == 0, (rerun.output[-3000:], rerun.exception)
        summary = json.loads(rerun.stdout.strip().splitlines()[-1])
        after = rater.snapshot() - before

        before.pop("untagged", None)  # the probe request each run starts with
        probes = after.pop("untagged", 0)
        assert probes == 1
        repeats = sum(1 for key in after if before[key])
        assert repeats <= in_flight * batch_size
        assert set(before) | set(after) == set(keys)
        assert sum(after.values()) <= 80 - 10 * len(finished_at_kill)
        for field in ("rated", "failed", "kept", "below", "requests", "prompt_tokens",
                      "completion_tokens", "est_cost_usd", "histogram"):
            assert field in summary
        assert summary["read"] == 80 and summary["rated"] == 80

        # the Prefect UI tells the truth: the killed flow run is Crashed, taken over by the
        # rerun (its stage lease went stale), and no flow run of the run id is left Running
        flow_runs, automations = _flow_runs_and_automations("rate-crash")
        assert not [r.name for r in flow_runs if r.state.is_running()]
        done = [r for r in flow_runs if r.state.is_completed()]
        crashed = [r for r in flow_runs if r.state.is_crashed()]
        assert len(done) == 1 and len(crashed) == 1, [(r.name, r.state) for r in flow_runs]
        assert crashed[0].state.message.startswith(f"taken over by {done[0].id}")
        # Prefect's own zombie detection: heartbeats on, and the automation that crashes a
        # run whose heartbeats stop (for a death no rerun follows)
        assert len(automations) == 1
        assert automations[0].trigger.within.total_seconds() == 3 * 180

        # an uninterrupted run (cache off) gives the same ratings; its batches need not be
        # the killed run's: two of 40 run at once, one round of Prefect tasks instead of four
        clean_summary = run_rate(
            config_for(store, stub, **{"rate.resources.batch_size": 40, "rate.cache": False}),
            "clean",
        )
    resumed, clean = ratings(store, "crash"), ratings(store, "clean")
    assert {i: (r["status"], r["score"]) for i, r in resumed.items()} == {
        i: (r["status"], r["score"]) for i, r in clean.items()
    }
    assert all(clean[i]["score"] == stable_score(key_of[i]) for i in clean)
    assert clean_summary["histogram"] == summary["histogram"]


@pytest.mark.slow
def test_offline_default_llama_cpp_rates_five_examples_in_score_only_mode(
    prefect_api, ray_local, tmp_path
) -> None:
    """No endpoint configured: gleaner starts llama.cpp with SmolLM2, rates, and stops it."""
    store = Store(str(tmp_path / "store"))
    keys = [f"l{i}" for i in range(5)]
    ingest(store, "offline", keys)
    config = GleanerConfig().with_overrides({"store.url": store.url,
                                             "rate.resources.batch_size": 5})
    assert config.rate.endpoint.base_url is None and config.rate.mode is None
    before = {p.pid for p in psutil.process_iter()}
    summary = run_rate(config, "offline")
    rated = ratings(store, "offline")
    assert len(rated) == 5
    assert all(r["status"] == "ok" and r["mode"] == "score-only" for r in rated.values())
    assert all(0.0 <= r["score"] <= 5.0 for r in rated.values())
    assert all(r["completion_tokens"] == 1 and r["prompt_tokens"] > 50 for r in rated.values())
    assert summary["mode"] == "score-only" and summary["model"] == "smollm2-135m-instruct"
    assert summary["requests"] == 6  # five ratings and one logprobs probe
    leftover = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "llama_server" in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftover, "the llama.cpp server was not stopped"
