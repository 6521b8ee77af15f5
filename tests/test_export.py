"""Dataset writers: each format written, read back, and re-ingested to the same example ids;
local folder and S3 (moto server); a failure half-way leaves nothing at the destination."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from gleaner.config import GleanerConfig
from gleaner.registry import registry
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import run_ingest
from gleaner.tasks.publish.export import infer_format, write_dataset


@pytest.fixture
def examples(tmp_path: Path, shared_data: Path) -> pa.Table:
    """Real LIMA (29 multi-turn rows) plus a ShareGPT conversation with a system prompt."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": [
        {"from": "system", "value": "Answer in French."},
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Bonjour"},
        {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "Merci à vous"},
    ]}) + "\n")
    store = Store(str(tmp_path / "store"))
    run_ingest([str(shared_data / "lima" / "lima.json")], store, "lima", GleanerConfig())
    run_ingest([str(chat)], store, "chat", GleanerConfig())
    tables = [store.read_stage("lima", "ingest"), store.read_stage("chat", "ingest")]
    return pa.concat_tables(tables)


def reingest_ids(path: Path, tmp_path: Path) -> list[str]:
    store = Store(str(tmp_path / f"re-{path.name}"))
    summary = run_ingest([str(path)], store, "again", GleanerConfig())
    assert summary["quarantined"] == 0
    return store.read_stage("again", "ingest").column("id").to_pylist()


def test_alpaca_json(examples, tmp_path):
    path = tmp_path / "out" / "data.json"
    result = write_dataset(examples, str(path))
    assert result["format"] == "alpaca" and result["rows"] == examples.num_rows
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = examples.to_pylist()
    assert [r["instruction"] for r in records] == [r["instruction"] for r in rows]
    assert [r["output"] for r in records] == [r["output"] for r in rows]
    multi = [r for r in records if "history" in r]
    assert len(multi) == 30
    assert records[-1]["system"] == "Answer in French."
    assert records[-1]["history"] == [["Hello", "Bonjour"]]
    assert reingest_ids(path, tmp_path) == examples.column("id").to_pylist()


def test_jsonl(examples, tmp_path):
    path = tmp_path / "data.jsonl"
    write_dataset(examples, str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == examples.num_rows
    assert [json.loads(line)["id"] for line in lines] == examples.column("id").to_pylist()
    assert reingest_ids(path, tmp_path) == examples.column("id").to_pylist()


def test_sharegpt(examples, tmp_path):
    path = tmp_path / "data.sharegpt.json"
    write_dataset(examples, str(path))
    records = json.loads(path.read_text(encoding="utf-8"))
    assert [t["from"] for t in records[-1]["conversations"]] == [
        "system", "human", "gpt", "human", "gpt"]
    assert records[-1]["conversations"][-1]["value"] == "Merci à vous"
    assert reingest_ids(path, tmp_path) == examples.column("id").to_pylist()


def test_parquet_keeps_plain_columns(examples, tmp_path):
    path = tmp_path / "data.parquet"
    scored = examples.append_column("quality", pa.array([0.5] * examples.num_rows))
    write_dataset(scored, str(path), batch_rows=100)  # several row groups
    back = pq.read_table(path)
    assert back.equals(scored)
    assert pq.ParquetFile(path).metadata.num_row_groups > 1


def test_parquet_loads_with_datasets(examples, tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    write_dataset(examples, str(path))
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.num_rows == examples.num_rows
    assert loaded[0]["conversation"][0]["role"] == "user"


def test_a_pyarrow_dataset_streams_out(examples, tmp_path):
    store = Store(str(tmp_path / "big"))
    for i, batch in enumerate(examples.to_batches(max_chunksize=300)):
        store.write_part("r", "select", i, pa.Table.from_batches([batch]))
    path = tmp_path / "from-dataset.jsonl"
    result = write_dataset(store.stage_dataset("r", "select"), str(path), batch_rows=50)
    assert result["rows"] == examples.num_rows == len(path.read_text().splitlines())


@pytest.mark.parametrize("fmt", registry("export_format").names())
def test_to_s3(examples, s3, fmt):
    url = f"s3://{s3['bucket']}/exports/data.{fmt}"
    options = {"endpoint_url": s3["endpoint_url"]}
    result = write_dataset(examples, url, fmt=fmt, storage_options=options)
    assert result["path"] == url and result["rows"] == examples.num_rows
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]},
                           skip_instance_cache=True)
    if fmt == "hf":  # a folder datasets reads back
        import datasets

        loaded = datasets.load_from_disk(url, storage_options={
            "client_kwargs": {"endpoint_url": s3["endpoint_url"]}})
        assert loaded.num_rows == examples.num_rows
        assert loaded["id"] == examples.column("id").to_pylist()
        return
    with fs.open(url, "rb") as handle:
        if fmt == "parquet":
            assert pq.read_table(handle).equals(examples)
        elif fmt == "jsonl":
            assert len(handle.read().splitlines()) == examples.num_rows
        else:
            assert len(json.load(handle)) == examples.num_rows


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failure_half_way_leaves_nothing(examples, tmp_path, s3, where):
    def batches_then_crash():
        yield from examples.to_batches(max_chunksize=200)[:3]
        raise RuntimeError("scorer crashed")

    if where == "local":
        url, options = str(tmp_path / "out" / "data.jsonl"), None
    else:
        url, options = f"s3://{s3['bucket']}/out/data.jsonl", {"endpoint_url": s3["endpoint_url"]}
    with pytest.raises(RuntimeError, match="scorer crashed"):
        write_dataset(batches_then_crash(), url, storage_options=options)
    if where == "local":
        assert not Path(url).exists()
    else:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]},
                               skip_instance_cache=True)
        assert not fs.exists(url)


def test_select_writes_a_datasets_folder_that_loads_back_with_the_same_rows(prefect_api,
                                                                           tmp_path) -> None:
    """``gleaner select --format hf --out DIR``: ``datasets.load_from_disk`` reads back the
    selected examples, row for row, in selection order."""
    import datasets
    from typer.testing import CliRunner

    from gleaner.flows.cli import app
    from gleaner.schema import Example, examples_to_table

    store = Store(str(tmp_path / "store"))
    pool = examples_to_table([Example("t", i, f"Question {i}?", "", f"Answer {i}.")
                              for i in range(12)])
    store.write_part("hf", "ingest", 0, pool)
    out = tmp_path / "export" / "selected-hf"
    result = CliRunner().invoke(app, [
        "select", "--run-id", "hf", "--store", store.url, "--selector", "random",
        "--budget", "5", "--out", str(out), "--format", "hf", "--json"])
    assert result.exit_code == 0, result.output
    loaded = datasets.load_from_disk(str(out))
    curated = store.read_stage("hf", "curated")
    assert loaded.num_rows == 5 and loaded.to_list() == curated.to_pylist()
    assert not any(p.name.startswith("selected-hf.tmp-") for p in out.parent.iterdir())


def test_unknown_extension_needs_a_format():
    assert infer_format("x/y.JSONL") == "jsonl"
    with pytest.raises(ValueError, match="cannot tell the export format"):
        infer_format("data.txt")


def test_hf_replaces_the_old_folder_and_refuses_an_empty_selection(examples, tmp_path):
    """A new export replaces the old folder whole (no staging or old folder left); zero rows,
    which datasets cannot load back, is a clear error that leaves the old folder as it was."""
    import datasets

    out = tmp_path / "ds"
    write_dataset(examples.slice(0, 3), str(out), fmt="hf")
    write_dataset(examples, str(out), fmt="hf")
    assert datasets.load_from_disk(str(out)).num_rows == examples.num_rows
    with pytest.raises(ValueError, match="nothing to export in the hf format"):
        write_dataset(examples.slice(0, 0), str(out), fmt="hf")
    assert datasets.load_from_disk(str(out)).num_rows == examples.num_rows
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ds")) == ["ds"]
