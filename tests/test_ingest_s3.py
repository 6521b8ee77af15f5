"""Ingest through s3:// against moto's S3 server (real HTTP on loopback, started by the fixture),
compared with the same ingest through a local folder; and sources read from s3://."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import s3fs

from gleaner.config import GleanerConfig
from gleaner.runs import read_run
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import IngestError, run_ingest

VOLATILE = {"seconds", "rows_per_s", "output", "quarantine_output", "duplicates_output"}


@pytest.fixture
def sources(tmp_path: Path, shared_data: Path) -> Path:
    """Real data plus some bad rows, in three file kinds."""
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copy(shared_data / "lima" / "lima.json", folder / "lima.json")
    records = json.loads((shared_data / "dolly" / "dolly_3k.json").read_text())[:500]
    with gzip.open(folder / "dolly.jsonl.gz", "wt", encoding="utf-8") as handle:
        for record in records + records[:3]:  # 3 duplicates
            handle.write(json.dumps(record) + "\n")
    (folder / "bad.jsonl").write_bytes(
        b'{"instruction": "x", "output": \n'
        b'{"instruction": "y", "output": "\xff"}\n'
        b'{"instruction": "z", "output": "fine"}\n'
    )
    return folder


def config_for(store_url: str, endpoint: str | None = None, batch_rows: int = 400) -> GleanerConfig:
    config = GleanerConfig()
    config.store.url = store_url
    if endpoint:
        config.store.options = {"endpoint_url": endpoint}
    config.ingest.batch_rows = batch_rows  # several parts per stage
    return config


def stage_bytes(store: Store, run_id: str, stage: str) -> dict[int, bytes]:
    paths = store.part_paths(store.stage_path(run_id, stage))
    return {index: store.read_bytes(path) for index, path in paths.items()}


def test_store_on_s3_matches_store_on_local_disk(tmp_path, sources, s3):
    files = [str(sources / name) for name in ("lima.json", "dolly.jsonl.gz", "bad.jsonl")]
    local = Store(str(tmp_path / "local-store"))
    remote = Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})
    local_summary = run_ingest(files, local, "same", config_for(local.url))
    remote_summary = run_ingest(files, remote, "same",
                                config_for(s3["url"], s3["endpoint_url"]))
    assert local_summary["kept"] == 1029 + 500 + 1 and local_summary["duplicates"] == 3
    assert local_summary["quarantined"] == 2
    assert {k: v for k, v in local_summary.items() if k not in VOLATILE} == {
        k: v for k, v in remote_summary.items() if k not in VOLATILE}
    assert remote_summary["output"].startswith(f"s3://{s3['bucket']}/store/runs/same/ingest")
    for stage in ("ingest", "quarantine", "duplicates"):
        local_parts = stage_bytes(local, "same", stage)
        assert local_parts and local_parts == stage_bytes(remote, "same", stage)
    assert local.read_stage("same", "ingest").equals(remote.read_stage("same", "ingest"))
    # the run record and the summary are in the bucket too
    bucket = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]},
                               skip_instance_cache=True)
    assert bucket.exists(f"{s3['bucket']}/store/runs/same/ingest/_summary.json")
    assert read_run(remote, "same")["ingest"]["kept"] == remote_summary["kept"]


def test_sources_read_from_s3(tmp_path, sources, s3):
    bucket = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]},
                               skip_instance_cache=True)
    for path in sources.iterdir():
        bucket.put_file(str(path), f"{s3['bucket']}/incoming/{path.name}")
    local_files = sorted(str(p) for p in sources.iterdir())
    from_disk = run_ingest(local_files, Store(str(tmp_path / "a")), "r",
                           config_for(str(tmp_path / "a")))

    # sources on S3, store on local disk: the endpoint comes from ingest.source_options
    config = config_for(str(tmp_path / "b"))
    config.ingest.source_options = {"endpoint_url": s3["endpoint_url"]}
    store = Store(str(tmp_path / "b"))
    from_s3 = run_ingest([f"s3://{s3['bucket']}/incoming/*"], store, "r", config)
    assert [s["source"] for s in from_s3["sources"]] == [
        f"s3://{s3['bucket']}/incoming/{Path(p).name}" for p in local_files]
    for key in ("read", "kept", "quarantined", "duplicates", "reasons"):
        assert from_s3[key] == from_disk[key]
    disk_rows = Store(str(tmp_path / "a")).read_stage("r", "ingest").drop_columns(["source"])
    s3_rows = store.read_stage("r", "ingest").drop_columns(["source"])
    assert disk_rows.equals(s3_rows)

    # sources and store on the same S3: the store's endpoint serves both
    remote = Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})
    both = run_ingest([f"s3://{s3['bucket']}/incoming/lima.json"], remote, "r",
                      config_for(s3["url"], s3["endpoint_url"]))
    assert both["kept"] == 1029


def test_missing_s3_source_stops_the_run_naming_it(s3):
    remote = Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})
    missing = f"s3://{s3['bucket']}/nope/data.jsonl"
    with pytest.raises(IngestError, match=missing):
        run_ingest([missing], remote, "r", config_for(s3["url"], s3["endpoint_url"]))
