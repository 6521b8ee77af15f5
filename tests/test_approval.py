"""Approval before publishing (publish.approval: required) against a real Prefect server.

`gleaner curate` runs as the user runs it, a process of its own on the session's Prefect
API, with every LLM call to the loopback stub and real MiniLM embeddings; it pauses at the
gate and waits in its process. `gleaner approve` decides from the test's process (typer's
CliRunner): a rejection leaves the current version current and ends the run in a Completed
state named "Not published"; an approval with a comment publishes, and the comment is in the
version's card (README.md). A second run reaching the gate supersedes the first, which ends
unpublished saying so; a run nobody decides on ends the same way at its timeout. Bad input
(a run not waiting, a second decision on the same run) is one message and exit 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.openai_server import OpenAIStub
from tests.support.pipeline import (
    ROOT,
    pipeline_responder,
    prefect_env,
    write_config,
    write_sample,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]  # whole curate runs
ROWS = 16


def approval_config(path: Path, store: Path, llm_url: str, approval: str = "required",
                    timeout_s: int = 600) -> Path:
    write_config(path, str(store), llm_url, budget=6)
    config = yaml.safe_load(path.read_text())
    config["publish"] = {"approval": approval, "approval_timeout_s": timeout_s}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_curate(api: str, sample: Path, config: Path, run_id: str, log: Path
                 ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from gleaner.flows.cli import main; main()", "curate",
         str(sample), "-c", str(config), "--run-id", run_id],
        cwd=ROOT, env=prefect_env(api), stdout=open(log, "wb"),  # noqa: SIM115 (the child's)
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for_gate(store: Path, run_id: str, process: subprocess.Popen[bytes], log: Path,
                  timeout_s: float = 300) -> dict:
    """The run's approval record once its flow run is paused at the gate."""
    from prefect.client.orchestration import get_client

    from gleaner.runs import read_approval
    from gleaner.store import Store

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"curate {run_id} exited {process.returncode}:\n"
                                 f"{log.read_text()[-4000:]}")
        record = read_approval(Store(str(store)), run_id)
        if record and record.get("state") == "waiting" and record.get("flow_run_id"):
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(UUID(record["flow_run_id"]))
            if run.state and run.state.is_paused():
                return record
        time.sleep(1)
    raise AssertionError(f"curate {run_id} never reached the gate:\n{log.read_text()[-4000:]}")


def finish(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300
           ) -> tuple[int, str]:
    process.wait(timeout=timeout_s)
    return process.returncode, log.read_text()


def approve(*args: str) -> object:
    from gleaner.flows.cli import app

    return CliRunner().invoke(app, ["approve", *args])


def flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state


def test_cli_curate_pauses_reject_keeps_the_current_version_approve_publishes(
        prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from gleaner.runs import read_approval
    from gleaner.store import Store
    from gleaner.tasks.publish.versions import list_versions

    store = tmp_path / "store"
    first = write_sample(tmp_path / "first.json", ROWS)
    later = write_sample(tmp_path / "later.json", ROWS, start=8)  # half the rows are new
    st = Store(str(store))
    with OpenAIStub(pipeline_responder) as llm:
        plain = approval_config(tmp_path / "plain.yaml", store, llm.base_url, approval="none")
        gated = approval_config(tmp_path / "gated.yaml", store, llm.base_url)
        code, log = finish(start_curate(prefect_api, first, plain, "appr-base",
                                        tmp_path / "base.log"), tmp_path / "base.log")
        assert code == 0, log[-4000:]
        (v1,) = list_versions(st, "curated")

        # a gated run pauses; what waits is an artifact on its flow run
        log1 = tmp_path / "r1.log"
        r1 = start_curate(prefect_api, later, gated, "appr-r1", log1)
        record = wait_for_gate(store, "appr-r1", r1, log1)
        assert record["dataset"] == "curated" and record["change"]["current"]["version"] == 1
        assert record["change"]["added"] > 0
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[UUID(record["flow_run_id"])])))
        (waiting,) = [a for a in artifacts if a.key == "approval-appr-r1"]
        assert f"+{record['change']['added']} added" in waiting.data
        assert "### Added (sample)" in waiting.data and "Cost so far" in waiting.data

        # bad input: a run that never asked, an unknown run
        result = approve("appr-base", "--store", str(store))
        assert result.exit_code == 1 and "never asked" in result.output
        result = approve("no-such-run", "--store", str(store))
        assert result.exit_code == 1 and "not waiting" in result.output

        result = approve("appr-r1", "--reject", "--comment", "too few new examples",
                         "--by", "ann", "--store", str(store))
        assert result.exit_code == 0, result.output
        assert "rejected by ann" in result.output
        again = approve("appr-r1", "--store", str(store))  # a second decision: refused
        assert again.exit_code == 1 and "not waiting" in again.output
        code, log = finish(r1, log1)
        assert code == 1 and "Not published: rejected by ann: too few new examples" in log
        assert [v["run_id"] for v in list_versions(st, "curated")] == ["appr-base"]
        state = flow_run_state(record["flow_run_id"])
        assert (state.type.value, state.name) == ("COMPLETED", "Not published")
        assert "rejected by ann" in state.message
        decided = read_approval(st, "appr-r1")
        assert (decided["state"], decided["by"], decided["note"]) == (
            "rejected", "ann", "too few new examples")

        # a second gated run, approved with a comment, publishes; the card says who and why
        log2 = tmp_path / "r2.log"
        r2 = start_curate(prefect_api, later, gated, "appr-r2", log2)
        wait_for_gate(store, "appr-r2", r2, log2)
        result = approve("appr-r2", "--comment", "new rows look right", "--by", "bob",
                         "--store", str(store))
        assert result.exit_code == 0, result.output
        code, log = finish(r2, log2)
        assert code == 0, log[-4000:]
        again = approve("appr-r2", "--store", str(store))
        assert again.exit_code == 1 and "approved by bob" in again.output

    versions = list_versions(st, "curated")
    assert [v["run_id"] for v in versions] == ["appr-base", "appr-r2"]  # published once
    assert versions[1]["diff"]["previous_version"] == v1["version"]
    decided = read_approval(st, "appr-r2")
    assert (decided["state"], decided["by"], decided["note"]) == (
        "approved", "bob", "new rows look right")
    assert decided["change"]["current"]["version"] == 1  # against the version current then
    card = (Path(versions[1]["path"]).parent / "README.md").read_text()
    assert "new rows look right" in card and "bob" in card


def test_a_newer_run_at_the_gate_supersedes_the_waiting_one_and_timeouts_end_unpublished(
        prefect_api, tmp_path):
    from gleaner.runs import read_approval
    from gleaner.store import Store
    from gleaner.tasks.publish.versions import list_versions

    store = tmp_path / "store"
    sample = write_sample(tmp_path / "sample.json", ROWS)
    st = Store(str(store))
    with OpenAIStub(pipeline_responder) as llm:
        gated = approval_config(tmp_path / "gated.yaml", store, llm.base_url)
        log1, log2 = tmp_path / "s1.log", tmp_path / "s2.log"
        s1 = start_curate(prefect_api, sample, gated, "sup-1", log1)
        first = wait_for_gate(store, "sup-1", s1, log1)
        s2 = start_curate(prefect_api, sample, gated, "sup-2", log2)
        wait_for_gate(store, "sup-2", s2, log2)
        code, log = finish(s1, log1)
        assert code == 1 and "superseded by run sup-2" in log
        record = read_approval(st, "sup-1")
        assert (record["state"], record["superseded_by"]) == ("superseded", "sup-2")
        state = flow_run_state(first["flow_run_id"])
        assert (state.type.value, state.name) == ("COMPLETED", "Not published")
        assert "superseded by run sup-2" in state.message
        result = approve("sup-1", "--store", str(store))
        assert result.exit_code == 1 and "superseded" in result.output

        # nobody decides on sup-2 in time... it was asked with a long timeout; a third run
        # with a short one times out
        assert approve("sup-2", "--reject", "--store", str(store)).exit_code == 0
        assert finish(s2, log2)[0] == 1
        short = approval_config(tmp_path / "short.yaml", store, llm.base_url, timeout_s=4)
        log3 = tmp_path / "s3.log"
        code, log = finish(start_curate(prefect_api, sample, short, "sup-3", log3), log3)
        assert code == 1 and "no decision within 4s" in log, log[-4000:]
        assert read_approval(st, "sup-3")["state"] == "timed out"
    assert list_versions(st, "curated") == []  # nothing was published
