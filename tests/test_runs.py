"""`gleaner runs`: every run of a store in its state; and a store that cannot be used is one
line from every verb (the URL and the cause), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import typer.main
from typer.testing import CliRunner

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.lease import Lease
from gleaner.engine.step import step_record_path
from gleaner.flows.cli import app
from gleaner.runs import record_run, request_approval
from gleaner.store import Store, StoreUnavailable, store_failure
from gleaner.tasks.publish.versions import publish_dataset_version


def summary(store: Store, run_id: str, stage: str, **fields) -> None:
    document = {"run_id": run_id, "stage": stage, "status": "completed", "examples": 10,
                "ok": 10, "failed": 0, "est_cost_usd": 0.25, "price_known": True,
                "max_failed_share": 0.1, **fields}
    store.write_json(layout.plan_path(store, run_id, stage), {"stage": stage})
    store.write_json(layout.summary_path(store, run_id, stage), document)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_lists_a_finished_a_failed_a_running_and_a_waiting_run(tmp_path) -> None:
    store = Store(str(tmp_path / "store"))
    config = GleanerConfig().with_overrides({"store.url": store.url})
    runner = CliRunner()

    empty = runner.invoke(app, ["runs", "--store", store.url])
    assert empty.exit_code == 1 and f"no runs in {store.url}" in empty.output

    # finished: ingest (a step), rate done, a dataset version published, a cost plan
    record_run(store, "r1-finished", config)
    store.write_json(step_record_path(store, "r1-finished", "ingest"),
                     {"step": "ingest", "summary": {"examples": 10}})
    summary(store, "r1-finished", "rate")
    publish_dataset_version(store, "alpaca", "r1-finished",
                            pa.table({"id": [f"e{i}" for i in range(4)]}))
    store.write_json(layout.cost_plan_path(store, "r1-finished"), {"total_usd": 0.5})
    # failed: rate over its failure budget; score crashed (a stale lease of a dead process)
    record_run(store, "r2-failed", config)
    summary(store, "r2-failed", "rate", ok=5, failed=5)
    store.write_json(layout.lease_path(store, "r2-failed", "score"), {
        "host": os.uname().nodename, "pid": dead_pid(), "runner": "x", "heartbeat": time.time(),
        "ttl_s": 60, "heartbeat_at": "2026-01-01T00:00:00+00:00", "stage": "score"})
    # waiting: its stages done, an approval asked for
    record_run(store, "r4-waiting", config)
    summary(store, "r4-waiting", "rate")
    request_approval(store, "r4-waiting", "publish")

    # running: this process holds the lease of its rate stage
    record_run(store, "r3-running", config)
    with Lease(store, "r3-running", "rate", heartbeat_s=30):
        listed = runner.invoke(app, ["runs", "--store", store.url, "--json"])
        text = runner.invoke(app, ["runs", "--store", store.url])
        shown = runner.invoke(app, ["runs", "show", "r3-running", "--store", store.url])
    assert listed.exit_code == 0, listed.output
    runs = {r["run_id"]: r for r in json.loads(listed.stdout)["runs"]}
    assert {k: r["state"] for k, r in runs.items()} == {
        "r1-finished": "finished", "r2-failed": "failed", "r3-running": "running",
        "r4-waiting": "awaiting approval"}
    finished = runs["r1-finished"]
    assert finished["counts"] == {"done": 2, "running": 0, "failed": 0}
    assert finished["published"][0]["dataset"] == "alpaca"
    assert finished["published"][0]["label"] == "v0001"
    assert finished["cost_usd"] == 0.25 and finished["planned_cost_usd"] == 0.5
    assert finished["started"]
    assert runs["r2-failed"]["counts"] == {"done": 0, "running": 0, "failed": 2}
    assert runs["r3-running"]["counts"]["running"] == 1
    assert runs["r4-waiting"]["awaiting_approval"] is True

    assert text.exit_code == 0, text.output
    lines = {line.split()[0]: line for line in text.output.splitlines()[1:]}
    assert "finished" in lines["r1-finished"] and "alpaca v0001" in lines["r1-finished"]
    assert "$0.2500" in lines["r1-finished"]
    assert "failed" in lines["r2-failed"] and "running" in lines["r3-running"]
    assert "awaiting approval" in lines["r4-waiting"] and "waiting" in lines["r4-waiting"]
    assert shown.exit_code == 0 and "run r3-running: running" in shown.output
    assert f"pid {os.getpid()}" in shown.output

    failed = runner.invoke(app, ["runs", "show", "r2-failed", "--store", store.url])
    assert failed.exit_code == 0, failed.output
    assert "over the failure budget" in failed.output and "crashed" in failed.output
    unknown = runner.invoke(app, ["runs", "show", "nope", "--store", store.url])
    assert unknown.exit_code == 2
    assert unknown.output.strip() == (f"gleaner: error: run 'nope' not found in {store.url}; "
                                      f"`gleaner runs --store {store.url}` lists its runs")


# ---- a store that cannot be used ---------------------------------------------------------------
def leaf_commands() -> dict[str, list[str]]:
    """Every verb of the CLI (a group's subcommands each), with its required parameters."""
    out: dict[str, list[str]] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        for name, sub in command.commands.items():
            if hasattr(sub, "commands"):
                if getattr(sub, "invoke_without_command", False):
                    out[" ".join((*path, name))] = []
                walk(sub, (*path, name))
            else:
                out[" ".join((*path, name))] = [p.opts[0] if p.opts else p.name
                                                for p in sub.params if p.required]

    walk(typer.main.get_command(app), ())
    return out


# verbs that never open the store
NO_STORE = {"config upgrade": "rewrites a local config file"}


@pytest.fixture
def fresh_s3_filesystems() -> Iterator[None]:
    """fsspec keeps one S3 filesystem per set of options: one made without credentials here
    must not serve the next test, whatever this one's outcome."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made with credentials earlier
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_verb_says_in_one_line_that_an_s3_store_has_no_credentials(
    s3, tmp_path, monkeypatch, fresh_s3_filesystems
) -> None:
    config = tmp_path / "gleaner.yaml"
    url = s3["url"]
    config.write_text(json.dumps({"store": {"url": url,
                                            "options": {"endpoint_url": s3["endpoint_url"]}}}))
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    values = {"--run-id": ["--run-id", "r1"], "sources": [str(source)], "kind": ["complexity"],
              "--model": ["--model", "m"], "--config": [], "path": [str(config)],
              "--seeds": ["--seeds", str(source)], "--count": ["--count", "1"],
              "run_id": ["r1"], "--to-hub": ["--to-hub", "me/ds"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nothing looks beyond loopback
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    runner = CliRunner()
    verbs = leaf_commands()
    assert {"rate", "plan", "runs", "runs show", "curate", "ingest"} <= set(verbs)
    checked = []
    for verb, required in verbs.items():
        if verb in NO_STORE:
            continue
        args = verb.split() + [a for name in required for a in values[name]]
        result = runner.invoke(app, [*args, "--config", str(config)])
        output = result.output.strip()
        if verb == "doctor":  # one line per check: the store's says why it failed
            assert result.exit_code == 1, output
            assert any(url in line and "FAILED" in line.upper() and "NoCredentials" in line
                       for line in output.splitlines()), output
            continue
        assert result.exit_code == 1, (verb, result.exit_code, output, result.exception)
        assert isinstance(result.exception, SystemExit), (verb, result.exception)
        assert output.splitlines() == [
            f"gleaner: error: cannot use store {url}: no credentials (set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role)"], (verb, output)
        checked.append(verb)
    assert len(checked) >= 25, checked


def test_a_missing_bucket_and_a_read_only_folder_are_one_line(s3, tmp_path, monkeypatch
                                                              ) -> None:
    missing = f"s3://{s3['bucket']}-missing/store"
    result = CliRunner().invoke(app, ["runs", "--store", missing, "--config", str(
        _config(tmp_path, missing, s3["endpoint_url"]))])
    assert result.exit_code == 1
    assert result.output.strip() == (f"gleaner: error: cannot use store {missing}: the bucket "
                                     f"'{s3['bucket']}-missing' does not exist")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes any folder: the check is told it may not
        real = os.access
        monkeypatch.setattr("gleaner.store.os.access", lambda path, mode: (
            False if str(path) == str(folder) else real(path, mode)))
    try:
        result = CliRunner().invoke(app, ["runs", "--store", str(folder)])
        assert result.exit_code == 1
        assert result.output.strip() == (f"gleaner: error: cannot use store {folder}: "
                                         f"permission denied: {folder}")
        if os.geteuid() != 0:  # a store folder to be made inside it
            nested = folder / "store"
            result = CliRunner().invoke(app, ["plan", "x.json", "--store", str(nested)])
            assert result.exit_code == 1, result.output
            assert result.output.startswith(f"gleaner: error: cannot use store {nested}: "
                                            "permission denied")
    finally:
        folder.chmod(0o700)


def _config(tmp_path: Path, url: str, endpoint: str) -> Path:
    path = tmp_path / "store.yaml"
    path.write_text(json.dumps({"store": {"url": url, "options": {"endpoint_url": endpoint}}}))
    return path


def test_store_failure_names_the_cause() -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    assert store_failure(NoCredentialsError()).startswith("no credentials")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    assert store_failure(denied) == "access denied (AccessDenied)"
    wrapped = RuntimeError("flow failed")
    wrapped.__cause__ = ClientError({"Error": {"Code": "NoSuchBucket"}}, "ListObjectsV2")
    assert store_failure(wrapped) == "the bucket does not exist"
    assert store_failure(ValueError("a bad config")) is None
    assert str(StoreUnavailable("s3://b/x", "why")) == "cannot use store s3://b/x: why"
