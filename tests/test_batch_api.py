"""LLM stages through the provider's Batch API, against a loopback Batch API server that
expires batches half-done, answers some requests in the error file and returns output lines
out of order: rating 2,000 real Alpaca examples (killed -9 while polling, rerun), score-only
rating, the endpoint scorer and the judge give the rows the synchronous path gives on the same
deterministic server; a rejected key in the output stops the stage; lost requests end as
failed rows with the provider's reason or go to the synchronous API. Real Prefect, real Ray,
real HTTP servers on loopback, the `gleaner` CLI as a subprocess for the kill."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from gleaner.config import GleanerConfig
from gleaner.flows.cli import app
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from tests.support.batch_server import BatchServer
from tests.support.faults import FaultyRater, example_key, examples
from tests.support.openai_server import OpenAIStub, Reply, request_text

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("status", "score", "raw", "error_kind", "mode", "prompt_tokens", "completion_tokens")


def digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def alpaca_rater(body: dict) -> Reply:
    """A deterministic rater: the score from the example's text; 2 % answer without a score."""
    text = request_text(body)
    if "Say hello." in text:
        return Reply("5\nA probe.")
    h = digest(text)
    if h % 50 == 0:
        return Reply("I would rather not put a number on this one.")
    return Reply(f"{h % 11 / 2:g}\nThe response follows the instruction; details vary.")


def rows_by_id(store: Store, run_id: str, stage: str = "rate") -> dict[str, dict]:
    return {r["id"]: r for r in store.read_stage(run_id, stage).to_pylist()}


def same_rows(a: dict[str, dict], b: dict[str, dict], columns: tuple[str, ...]) -> None:
    assert set(a) == set(b)
    differing = [i for i in a if any(a[i][c] != b[i][c] for c in columns)]
    assert not differing, [(a[i], b[i]) for i in differing[:3]]


def ingest_alpaca(shared_data: Path, store: Store, run_id: str, n: int) -> None:
    from gleaner.tasks.ingest.ingest import run_ingest

    config = GleanerConfig().with_overrides({"store.url": store.url, "ingest.limit": n})
    run_ingest([str(shared_data / "alpaca" / "alpaca_random_9k.json")], store, run_id, config)


def _env(prefect_api: str) -> dict[str, str]:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT), "GLEANER_PROGRESS": "plain"}


def _kill_tree(process: subprocess.Popen) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@pytest.mark.slow  # 2,000 real examples, twice, and a subprocess killed and rerun (~2 min)
def test_2000_alpaca_examples_through_the_batch_api_killed_while_polling_equal_the_sync_path(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.rate_flow import run_rate

    sync_store, batch_store = Store(str(tmp_path / "sync")), Store(str(tmp_path / "batch"))
    ingest_alpaca(shared_data, sync_store, "alpaca", 2000)
    ingest_alpaca(shared_data, batch_store, "alpaca", 2000)
    settings = {"rate": {"endpoint": {"model": "stub", "max_retries": 0}, "mode": "explain",
                         "resources": {"batch_size": 250, "concurrency": 32,
                                       "retry_delay_s": 0}},
                "prices": {"stub": {"prompt": 1.0, "completion": 2.0}},
                "batch_api": {"poll_interval_s": 0.05, "max_requests_per_file": 500}}
    with OpenAIStub(alpaca_rater) as stub:
        config = GleanerConfig.model_validate(settings).with_overrides(
            {"store.url": sync_store.url, "rate.endpoint.base_url": stub.base_url})
        sync_summary = run_rate(config, "alpaca")

    settings["store"] = {"url": batch_store.url}
    config_file = tmp_path / "batch.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    with BatchServer(alpaca_rater, complete_after_s=600) as server:
        server.expire = {1}  # the second file of round 1 expires half-done
        server.shuffle = True
        # some first requests (no occurrence or resubmission suffix) come back in the error file
        server.error_ids = lambda cid: cid.count("-") == 1 and "~" not in cid and \
            digest(cid) % 40 == 0
        command = [sys.executable, "-m", "gleaner.flows.cli", "rate", "--run-id", "alpaca",
                   "--base-url", server.base_url, "--config", str(config_file), "--batch-api",
                   "--json"]
        process = subprocess.Popen(command, env=_env(prefect_api), cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while len(server.batches) < 4 or server.calls["batches.retrieve"] < 8:
                assert process.poll() is None, process.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the driver never got to polling"
                time.sleep(0.1)
        finally:
            _kill_tree(process)
        created = server.calls["batches.create"]
        assert created == 4 and not batch_store.has_stage("alpaca", "rate")
        server.complete_after_s = 0.3  # the provider finishes what it was given ...
        for batch_id in server.due:
            server.due[batch_id] = time.monotonic() + 0.3
        # the rerun: the same CLI in this process (same Ray, same Prefect API as the killed
        # one), which spares a second interpreter's start-up
        rerun = CliRunner().invoke(app, command[3:])
        assert rerun.exit_code == 0, (rerun.output[-3000:], rerun.exception)
        submitted = dict(server.submitted)
    # ... and the rerun polled the same 4 batches: no custom_id was ever sent twice
    assert max(submitted.values()) == 1
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    usage, n = summary["batch_api"], summary["examples"]
    assert n == sync_summary["examples"] > 1990  # 2,000 records read, the duplicates dropped
    # every example once, each lost request once more, two parse retries per unparseable one
    assert len(submitted) == n + usage["lost"] + 2 * summary["failures"]["parse"]
    assert usage["lost"] > 250  # the expired half of a file, and the error-file lines
    synced, batched = rows_by_id(sync_store, "alpaca"), rows_by_id(batch_store, "alpaca")
    assert len(batched) == n
    assert all(r["status"] == "ok" or (r["status"] == "failed" and r["error"] and r["error_kind"])
               for r in batched.values())
    same_rows(synced, batched, COMPARED)
    assert summary["failures"] == sync_summary["failures"] and summary["failures"]["parse"] > 10
    # rounds: the first requests; the lost ones and first parse retries; the second ones
    # (and one more when a lost request's answer needed parse retries too)
    assert usage["examples"] == n and usage["rounds"] in (3, 4)
    assert usage["sent"] == len(submitted)
    # the same tokens, billed at half the price (the probe is the one synchronous request)
    assert summary["prompt_tokens"] == sync_summary["prompt_tokens"]
    assert summary["est_cost_usd"] == pytest.approx(sync_summary["est_cost_usd"] / 2, rel=0.01)
    assert usage["saved_usd"] == pytest.approx(usage["cost_usd"], abs=1e-5)


def _rate(store: Store, base_url: str, run_id: str, api: str, **overrides) -> dict:
    from gleaner.flows.rate_flow import run_rate

    config = GleanerConfig().with_overrides({
        "store.url": store.url, "rate.endpoint.base_url": base_url,
        "rate.endpoint.model": "stub", "rate.endpoint.max_retries": 0,
        "rate.endpoint.api": api, "rate.mode": "explain", "rate.resources.batch_size": 10,
        "rate.resources.retry_delay_s": 0, "batch_api.poll_interval_s": 0.1, **overrides})
    return run_rate(config, run_id)


def test_score_only_rating_through_batches_equals_the_sync_path(prefect_api, ray_local,
                                                                 tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    table = examples_to_table(examples([f"s{i}" for i in range(30)]))
    for run_id in ("sync", "batch"):
        store.write_part(run_id, "ingest", 0, table)
    rater = FaultyRater()  # one token with top_logprobs: the expected score over "0".."5"
    with OpenAIStub(rater) as stub:
        sync = _rate(store, stub.base_url, "sync", "chat", **{"rate.mode": "score-only",
                                                               "rate.cache": False})
    with BatchServer(rater, complete_after_s=0.1) as server:
        server.shuffle = True
        batch = _rate(store, server.base_url, "batch", "batch",
                      **{"rate.mode": "score-only", "rate.cache": False})
        bodies = server.batch_bodies
    assert sync["rated"] == batch["rated"] == 30 and batch["mode"] == "score-only"
    assert all(b["logprobs"] and b["top_logprobs"] == 20 and b["max_tokens"] == 1
               for b in bodies)
    same_rows(rows_by_id(store, "sync"), rows_by_id(store, "batch"), COMPARED)
    # the flow run shows each batch's status and counts, and how far the requests are
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["rate-batch-api-batch"])))
        bars = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["rate-batch-api-batch-progress"])))
    last = max(tables, key=lambda a: a.created)
    [row] = json.loads(last.data) if isinstance(last.data, str) else last.data
    assert (row["status"], row["requests"], row["answered"], row["lost"]) == (
        "completed", 30, 30, 0)
    assert bars and float(max(bars, key=lambda a: a.updated).data) == 100.0


def scorer(body: dict) -> Reply:
    text = request_text(body)
    h = digest(text) % 5
    if "##Complexity" in text:
        return Reply(content="2", top_logprobs=[{"2": math.log(0.5), str(h + 1): math.log(0.5)}])
    return Reply(content="5", top_logprobs=[{"5": math.log(0.9), "6": math.log(0.1)}])


def test_the_endpoint_scorer_through_batches_equals_the_sync_path(prefect_api, ray_local,
                                                                   tmp_path: Path) -> None:
    from gleaner.flows.deita_flow import run_score

    store = Store(str(tmp_path / "store"))
    pool = examples_to_table([Example("unit", i, f"Task {i}", output=f"Done {i}")
                              for i in range(24)])
    results = {}
    for run_id, server_type, api in (("sync", OpenAIStub, "chat"), ("batch", BatchServer,
                                                                   "batch")):
        store.write_part(run_id, "ingest", 0, pool)
        with server_type(scorer) as server:
            config = GleanerConfig().with_overrides({
                "store.url": store.url, "score.backend": "endpoint",
                "score.endpoint": {"base_url": server.base_url, "model": "deita",
                                   "max_retries": 0, "api": api},
                "score.complexity_model": "complexity-scorer",
                "score.quality_model": "quality-scorer", "score.resources.batch_size": 8,
                "score.cache": False, "batch_api.poll_interval_s": 0.1})
            results[run_id] = run_score(store, run_id, config)
            if api == "batch":
                created = [b["endpoint"] for b in server.batches.values()]
                models = {b["model"] for b in server.batch_bodies}
    assert results["sync"]["scored"] == results["batch"]["scored"] == 24
    assert created == ["/v1/completions"] * 2  # one file per model: a batch holds one model
    assert models == {"complexity-scorer", "quality-scorer"}
    same_rows(rows_by_id(store, "sync", "score"), rows_by_id(store, "batch", "score"),
              ("status", "complexity", "quality", "evol", "complexity_model", "quality_model"))


ANSWER_RE = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\n\[The End", re.S)


def length_judge(body: dict) -> Reply:
    """Scores each answer by its length, whatever position it is shown in."""
    answers = dict(ANSWER_RE.findall(body["messages"][1]["content"]))
    scores = [min(10, 1 + len(answers[k]) % 10) for k in ("1", "2")]
    return Reply(f"{scores[0]} {scores[1]}\nExplained.")


def test_the_judge_through_batches_equals_the_sync_path(prefect_api, ray_local,
                                                        tmp_path: Path) -> None:
    from gleaner.flows.evaluate_flow import evaluate_flow

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": "a" * (i + 3)}) + "\n"
                         for i in range(12)))
    b.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": "b" * (2 * i + 1)}) + "\n"
                         for i in range(12)))
    summaries = {}
    for run_id, server_type, api in (("sync", OpenAIStub, "chat"), ("batch", BatchServer,
                                                                   "batch")):
        store = Store(str(tmp_path / run_id))
        with server_type(length_judge) as server:
            config = GleanerConfig().with_overrides({
                "store.url": store.url, "evaluate.endpoint.base_url": server.base_url,
                "evaluate.endpoint.api": api, "evaluate.resources.batch_size": 5,
                "batch_api.poll_interval_s": 0.1})
            summaries[run_id] = evaluate_flow(run_id=run_id, config=config, answers_a=str(a),
                                              answers_b=str(b))
            if api == "batch":
                assert len(server.batch_bodies) == 24  # both orders of 12 pairs
    for key in ("win", "tie", "lose", "failed"):
        assert summaries["sync"]["overall"][key] == summaries["batch"]["overall"][key]
    assert summaries["batch"]["overall"]["failed"] == 0


def test_a_rejected_key_in_the_batch_output_stops_the_stage(prefect_api, ray_local,
                                                            tmp_path: Path) -> None:
    from gleaner.engine import FatalStageError

    store = Store(str(tmp_path / "store"))
    store.write_part("key", "ingest", 0, examples_to_table(examples(range(20))))

    def key_checked_late(body: dict) -> Reply:  # the probe passes; the batch's lines do not
        if example_key(body) is None:
            return Reply("5\nA probe.")
        return Reply(status=401, error_message="Incorrect API key provided: sk-wrong-012345678")

    with BatchServer(key_checked_late, complete_after_s=0.1) as server, \
            pytest.raises(FatalStageError) as stopped:
        _rate(store, server.base_url, "key", "batch")
    assert "rejected the API key" in str(stopped.value)
    assert "sk-wrong-012345678" not in str(stopped.value)
    assert not store.has_stage("key", "rate")  # no row was made up: a rerun resumes


def test_lost_requests_fail_with_the_providers_reason_or_go_synchronous(
        prefect_api, ray_local, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    for run_id in ("fail", "sync"):
        store.write_part(run_id, "ingest", 0, examples_to_table(examples(range(40))))
    rater = FaultyRater()
    with BatchServer(rater, complete_after_s=0.1) as server:
        server.expire = {0}  # half of the only batch expires; nothing is sent again
        failed = _rate(store, server.base_url, "fail", "batch", **{
            "batch_api.resubmits": 0, "rate.max_failed_share": 1.0, "rate.cache": False})
        assert (failed["rated"], failed["failed"]) == (20, 20)
        assert failed["failures"] == {"batch_expired": 20}
        rows = [r for r in rows_by_id(store, "fail").values() if r["status"] == "failed"]
        assert all("did not answer" in r["error"] and "batch_expired" in r["error"]
                   for r in rows)
        # --retry-failed asks exactly those rows again, under new custom ids
        retried = _rate(store, server.base_url, "fail", "batch", **{
            "batch_api.resubmits": 0, "rate.retry_failed": True, "rate.cache": False})
        again = [c for c in server.submitted if c.endswith("~1")]
    assert (retried["rated"], retried["failed"]) == (40, 0)
    assert len(again) == 20 and max(server.submitted.values()) == 1

    with BatchServer(rater, complete_after_s=0.1) as server:
        server.expire = {0}
        synced = _rate(store, server.base_url, "sync", "batch", **{
            "batch_api.retries_via": "sync", "rate.cache": False})
        sync_calls = server.count()
    # the expired half went to the synchronous endpoint at once: the same server's chat route
    assert synced["rated"] == 40 and synced["failed"] == 0
    assert sync_calls == 1 + 20  # the probe, then the 20 lost requests
    assert synced["batch_api"]["examples"] == 20 and synced["batch_api"]["rounds"] == 1
