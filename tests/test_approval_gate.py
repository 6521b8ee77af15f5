"""The approval gate's parts that need no Prefect server: the publish lock, the refusals of
`gleaner approve` for a run not waiting, the decision record."""

from __future__ import annotations

import json
import threading

import pytest

from gleaner.runs import decide_approval, read_approval, request_approval
from gleaner.store import Store
from gleaner.tasks.publish.approval import (
    ApprovalError,
    answer_approval,
    not_published_message,
    publish_lock,
)


def test_one_publish_per_dataset_at_a_time(tmp_path):
    store = Store(str(tmp_path / "store"))
    order: list[str] = []
    with publish_lock(store, "curated", "run-a"):
        second = threading.Thread(target=lambda: _publish(store, "run-b", order))
        second.start()
        second.join(timeout=1.5)
        assert second.is_alive() and order == []  # waits for the first
        order.append("run-a")
    second.join(timeout=10)
    assert order == ["run-a", "run-b"]
    with (publish_lock(store, "curated", "run-c"), pytest.raises(TimeoutError, match="run-c"),
          publish_lock(store, "curated", "run-d", wait_s=0.5, poll_s=0.1)):
        pass


def _publish(store: Store, run_id: str, order: list[str]) -> None:
    with publish_lock(store, "curated", run_id, poll_s=0.1):
        order.append(run_id)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket

    store = Store(str(tmp_path / "store"))
    lock = tmp_path / "store" / "datasets" / "curated" / "_publish.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(),
                                "pid": 2**22 + 12345, "heartbeat": 0, "ttl_s": 3600}))
    with publish_lock(store, "curated", "alive", wait_s=2):
        assert json.loads(lock.read_text())["run_id"] == "alive"
    assert not lock.exists()


def test_approve_refuses_a_run_not_waiting_and_a_second_decision(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ApprovalError, match="never asked"):
        answer_approval(store, "run-1", True)
    request_approval(store, "run-1", "publish", dataset="curated", flow_run_id=None)
    decide_approval(store, "run-1", True, by="ann", note="fine")
    with pytest.raises(ApprovalError, match="not waiting for an approval: approved by ann"):
        answer_approval(store, "run-1", False)
    record = read_approval(store, "run-1")
    assert (record["state"], record["by"], record["note"]) == ("approved", "ann", "fine")
    with pytest.raises(ValueError, match="approval state"):
        decide_approval(store, "run-1", False, state="maybe")


def test_not_published_says_why():
    assert not_published_message({"state": "rejected", "by": "ann", "note": "too few"}) == (
        "Not published: rejected by ann: too few; the current version stays current")
    assert "superseded by run r2" in not_published_message(
        {"state": "superseded", "superseded_by": "r2", "note": "superseded by run r2"})
    assert "no decision within 60s" in not_published_message(
        {"state": "timed out", "timeout_s": 60})
