"""Dataset versions: immutable folders, a manifest written last, and the diff between refreshes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from gleaner.tasks.publish.versions import (
    diff_ingest,
    diff_markdown,
    latest_version,
    list_versions,
    publish_dataset_version,
    read_version,
)


def pool(n: int, start: int = 0, suffix: str = "") -> list[Example]:
    return [
        Example(
            source="pool.jsonl", source_row=i, instruction=f"Task {i}", output=f"Answer {i}{suffix}"
        )
        for i in range(start, start + n)
    ]


def test_first_version_counts_everything_as_added(tmp_path):
    store = Store(str(tmp_path))
    table = examples_to_table(pool(10))
    manifest = publish_dataset_version(store, "alpaca-curated", "run-1", table, {"kept": 10})

    assert manifest["version"] == 1 and manifest["label"] == "v0001"
    assert manifest["path"].endswith("datasets/alpaca-curated/v0001/data.parquet")
    assert manifest["counts"]["examples"] == 10
    assert manifest["diff"]["added"] == 10
    assert manifest["diff"]["removed"] == 0 and manifest["diff"]["previous_version"] is None
    assert (tmp_path / "datasets/alpaca-curated/v0001/manifest.json").exists()
    published = read_version(store, "alpaca-curated")
    assert published.column("id").to_pylist() == table.column("id").to_pylist()


def test_refresh_diff_counts_added_removed_unchanged_and_requests(tmp_path):
    store = Store(str(tmp_path))
    first = pool(20)
    publish_dataset_version(store, "ds", "run-1", examples_to_table(first))

    # Refresh: rows 0-2 removed, rows 3-4 edited (new content, new id), 5 new rows added.
    edited = pool(2, start=3, suffix=" (edited)")
    second = edited + first[5:] + pool(5, start=100)
    stats = {"requests_sent": 7, "requests_saved": 15, "kept": len(second)}
    manifest = publish_dataset_version(store, "ds", "run-2", examples_to_table(second), stats)

    diff = manifest["diff"]
    assert manifest["version"] == 2
    assert diff["previous_version"] == 1 and diff["previous_run_id"] == "run-1"
    assert diff["added"] == 2 + 5  # edits are new ids
    assert diff["removed"] == 3 + 2
    assert diff["unchanged"] == 15
    assert diff["requests_sent"] == 7 and diff["requests_saved"] == 15
    assert [m["version"] for m in list_versions(store, "ds")] == [1, 2]
    # the old version is untouched
    assert read_version(store, "ds", 1).num_rows == 20
    assert read_version(store, "ds", 2).num_rows == 22

    report = diff_markdown(manifest)
    assert "| added | 7 |" in report and "| removed | 5 |" in report
    assert "| unchanged | 15 |" in report and "| requests saved | 15 |" in report
    assert "since v0001" in report


def test_publish_is_idempotent_per_run(tmp_path):
    """A Prefect retry of the publish task must not create a second version."""
    store = Store(str(tmp_path))
    table = examples_to_table(pool(4))
    first = publish_dataset_version(store, "ds", "run-1", table)
    again = publish_dataset_version(store, "ds", "run-1", table)
    assert again == first
    assert len(list_versions(store, "ds")) == 1


def test_interrupted_publish_is_ignored_and_its_number_reused(tmp_path):
    store = Store(str(tmp_path))
    publish_dataset_version(store, "ds", "run-1", examples_to_table(pool(3)))
    # a crash after data.parquet but before manifest.json
    orphan = tmp_path / "datasets/ds/v0002"
    orphan.mkdir(parents=True)
    (orphan / "data.parquet").write_bytes(b"half a file")

    assert latest_version(store, "ds")["version"] == 1
    manifest = publish_dataset_version(store, "ds", "run-2", examples_to_table(pool(4)))
    assert manifest["version"] == 2
    assert read_version(store, "ds").num_rows == 4
    assert manifest["diff"] == {
        "added": 1, "removed": 0, "unchanged": 3, "previous_version": 1, "previous_run_id": "run-1"
    }


def test_versions_on_s3(s3):
    store = Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})
    publish_dataset_version(store, "ds", "run-1", examples_to_table(pool(6)))
    manifest = publish_dataset_version(store, "ds", "run-2", examples_to_table(pool(6, start=2)))
    assert manifest["uri"].startswith(f"s3://{s3['bucket']}/store/datasets/ds/v0002")
    diff = manifest["diff"]
    assert (diff["added"], diff["removed"], diff["unchanged"]) == (2, 2, 4)
    assert read_version(store, "ds").num_rows == 6


def test_bad_inputs_are_refused_with_a_message(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ValueError, match="dataset name"):
        publish_dataset_version(store, "../escape", "run-1", examples_to_table(pool(1)))
    with pytest.raises(ValueError, match="'id' column"):
        publish_dataset_version(store, "ds", "run-1", pa.table({"text": ["x"]}))
    with pytest.raises(FileNotFoundError, match="no any version|has no"):
        read_version(store, "missing")


def test_diff_ingest_compares_two_runs_pools(tmp_path):
    store = Store(str(tmp_path))
    before = pool(100)
    # 5 % changed: 2 edited, 2 deleted, 1 added
    after = pool(2, start=0, suffix="!") + before[2:98] + pool(1, start=500)
    store.write_part("run-a", "examples", 0, examples_to_table(before[:50]))
    store.write_part("run-a", "examples", 1, examples_to_table(before[50:]))
    store.write_part("run-b", "examples", 0, examples_to_table(after))

    diff = diff_ingest(store, "run-a", "run-b")
    assert diff == {
        "previous_run_id": "run-a", "run_id": "run-b", "previous_total": 100, "total": 99,
        "added": 3, "removed": 4, "unchanged": 96,
    }
    with pytest.raises(FileNotFoundError, match="run-c"):
        diff_ingest(store, "run-a", "run-c")
