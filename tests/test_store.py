"""The checkpoint store: atomic parts (a killed write leaves nothing visible), finished-part
listing, stage datasets, on a local folder and on S3 (moto server); the run record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gleaner.store as store_module
from gleaner.config import GleanerConfig
from gleaner.runs import read_run, record_run
from gleaner.schema import QUARANTINE_SCHEMA
from gleaner.store import Store

ROOT = Path(__file__).resolve().parents[1]


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"id-{i}" for i in range(start, start + n)],
                     "value": list(range(start, start + n))})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3")
    return Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})


def test_parts_round_trip_as_one_dataset(store):
    store.write_part("r1", "rate", 0, table(3))
    store.write_part("r1", "rate", 1, table(2, start=3))
    store.write_part("r1", "score", 0, table(1))
    assert store.finished_parts("r1", "rate") == {0, 1}
    assert store.read_stage("r1", "rate").column("value").to_pylist() == [0, 1, 2, 3, 4]
    assert store.has_stage("r1", "score") and not store.has_stage("r1", "embed")
    assert store.list_runs() == ["r1"]
    assert store.read_stage("r1", "embed", schema=QUARANTINE_SCHEMA).num_rows == 0
    with pytest.raises(FileNotFoundError, match="'embed'"):
        store.read_stage("r1", "embed")


def test_a_write_that_fails_half_way_leaves_no_part(store, monkeypatch):
    store.write_part("r", "rate", 0, table(3))
    real_write_table = pq.write_table

    def dies_half_way(data, where, **kwargs):
        real_write_table(data.slice(0, 1), where, **kwargs)  # some bytes are out...
        raise OSError("disk unplugged")  # ...then the write dies

    monkeypatch.setattr(store_module.pq, "write_table", dies_half_way)
    with pytest.raises(OSError, match="unplugged"):
        store.write_part("r", "rate", 1, table(3, start=3))
    assert store.finished_parts("r", "rate") == {0}
    assert store.read_stage("r", "rate").num_rows == 3


def test_a_local_write_that_fails_after_the_data_is_out_cleans_its_temp_file(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))

    def fsync_fails(fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(store_module.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="I/O error"):
        store.write_part("r", "rate", 0, table(100))
    assert store.finished_parts("r", "rate") == set()
    assert os.listdir(store.stage_path("r", "rate")) == []  # no temp file left behind


def test_a_killed_process_leaves_no_visible_partial_part(tmp_path):
    """A real SIGKILL while part 1 is being written (its bytes are in the temp file)."""
    root = tmp_path / "store"
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import os, time
        import pyarrow as pa
        import gleaner.store as store_module
        from gleaner.store import Store

        store = Store({str(root)!r})
        store.write_part("r", "rate", 0, pa.table({{"v": list(range(10))}}))

        def stall(fd):
            open({str(marker)!r}, "w").close()
            time.sleep(60)

        store_module.os.fsync = stall
        store.write_part("r", "rate", 1, pa.table({{"v": list(range(10, 20))}}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    store = Store(str(root))
    stage = Path(store.stage_path("r", "rate"))
    leftovers = [p.name for p in stage.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the killed write's bytes exist, under a temp name
    assert store.finished_parts("r", "rate") == {0}
    assert store.read_stage("r", "rate").column("v").to_pylist() == list(range(10))


def test_finished_parts_lists_only_complete_parts(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_part("r", "rate", 2, table(1))
    stage = Path(store.stage_path("r", "rate"))
    (stage / ".tmp-0123-part-00003.parquet").write_bytes(b"PAR1 half")
    (stage / "part-7.parquet").write_bytes(b"not our name")
    (stage / "notes.txt").write_text("x")
    assert store.finished_parts("r", "rate") == {2}
    assert store.read_stage("r", "rate").num_rows == 1


def test_run_json_records_config_and_versions_without_secrets(store, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    config = GleanerConfig()
    config.rate.endpoint.model = "gpt-4"
    config.ingest.batch_rows = 123
    first = record_run(store, "run-1", config)
    record_run(store, "run-1", config, ingest={"kept": 5})
    record = read_run(store, "run-1")
    assert GleanerConfig.model_validate(record["config"]) == config
    assert record["versions"]["pyarrow"] == pa.__version__
    assert record["versions"]["python"].count(".") == 2
    assert record["created_at"] == first["created_at"]
    assert record["ingest"] == {"kept": 5}
    text = store.read_bytes(store.run_path("run-1", "run.json")).decode()
    assert "sk-very-secret-key" not in text
    assert json.loads(text)["run_id"] == "run-1"


@pytest.mark.parametrize("bad", ["../escape", "", "a/b", ".hidden"])
def test_run_ids_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises(ValueError, match="run id"):
        Store(str(tmp_path)).run_path(bad)


def test_store_repr_hides_its_options():
    store = Store("memory://x", {"endpoint_url": "http://127.0.0.1:1"})
    assert "127.0.0.1" not in repr(store)
