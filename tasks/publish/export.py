"""Writers for the final dataset: Alpaca JSON, JSON lines, Parquet, ShareGPT, to any fsspec path.

Input is EXAMPLE_SCHEMA rows (a pyarrow Table, Dataset, or record batches);
extra columns (scores, ratings) are kept in Parquet and left out of the JSON
formats, whose records follow the shape fine-tuning tools expect:

- ``alpaca``: one JSON array of ``{instruction, input, output}``, plus ``history``
  (earlier ``[user, assistant]`` pairs, LIMA/LLaMA-Factory style) and ``system``
  when an example has them;
- ``jsonl``: the same records, one per line, with the example ``id``;
- ``sharegpt``: a JSON array of ``{id, conversations: [{from, value}]}``;
- ``parquet``: the columns as they are (``datasets.load_dataset("parquet", ...)`` reads them);
- ``hf``: a Hugging Face ``datasets`` folder (``save_to_disk``; ``load_from_disk`` reads it),
  the columns as they are.

Files appear whole or not at all: the write runs in an fsspec transaction
(temp file + move on a local disk, multipart upload completed only on commit
on S3), so a failure half-way leaves nothing at the destination.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gleaner.registry import register, registry
from gleaner.schema import user_assistant_pairs
from gleaner.tasks.ingest.readers import fs_options

SHAREGPT_SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}

Data = pa.Table | ds.Dataset | Iterable[pa.RecordBatch]


def infer_format(path: str) -> str:
    """Export format from the file name: .parquet, .jsonl, .sharegpt.json, else .json = Alpaca."""
    name = posixpath.basename(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".sharegpt.json"):
        return "sharegpt"
    if name.endswith(".json"):
        return "alpaca"
    raise ValueError(
        f"cannot tell the export format of {path}: name it .json (Alpaca), .jsonl, .parquet "
        "or .sharegpt.json, or pass the format"
    )


def record_batches(data: Data, batch_rows: int = 10_000) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=batch_rows)
    elif isinstance(data, ds.Dataset):
        yield from data.to_batches(batch_size=batch_rows)
    else:
        yield from data


def _split_conversation(conversation: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, earlier turns): the final user/assistant pair is instruction/output."""
    turns = list(conversation or [])
    system = ""
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    return system, turns[:-2]


def alpaca_record(row: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "instruction": row["instruction"],
        "input": row["input"],
        "output": row["output"],
    }
    system, earlier = _split_conversation(row.get("conversation") or [])
    if earlier:
        record["history"] = [list(pair) for pair in user_assistant_pairs(earlier)]
    if system:
        record["system"] = system
    return record


def jsonl_record(row: dict[str, Any]) -> dict[str, Any]:
    """An example in Alpaca's fields with its id; any other row (preference pairs) as is."""
    if "output" not in row:
        return row
    return {"id": row["id"], **alpaca_record(row)}


def sharegpt_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "conversations": [
            {"from": SHAREGPT_SPEAKERS[turn["role"]], "value": turn["content"]}
            for turn in row["conversation"]
        ],
    }


def _write_json_array(handle: IO[bytes], batches: Iterator[pa.RecordBatch], to_record: Any) -> int:
    rows = 0
    handle.write(b"[\n")
    for batch in batches:
        for row in batch.to_pylist():
            prefix = b",\n" if rows else b""
            handle.write(prefix + json.dumps(to_record(row), ensure_ascii=False).encode("utf-8"))
            rows += 1
    handle.write(b"\n]\n")
    return rows


def _write_jsonl(handle: IO[bytes], batches: Iterator[pa.RecordBatch]) -> int:
    rows = 0
    for batch in batches:
        lines = [json.dumps(jsonl_record(row), ensure_ascii=False) for row in batch.to_pylist()]
        if lines:
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))
        rows += len(lines)
    return rows


def _write_parquet(handle: IO[bytes], batches: Iterator[pa.RecordBatch]) -> int:
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            if writer is None:
                writer = pq.ParquetWriter(handle, batch.schema, compression="zstd")
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no batch at all: still a valid (empty) file
        pq.write_table(pa.table({"id": pa.array([], pa.string())}), handle)
    return rows


# The export formats: each writes record batches to an open binary file, returns the row count.
register("export_format", "alpaca")(lambda h, b: _write_json_array(h, b, alpaca_record))
register("export_format", "sharegpt")(lambda h, b: _write_json_array(h, b, sharegpt_record))
register("export_format", "jsonl")(_write_jsonl)
register("export_format", "parquet")(_write_parquet)


class HFDatasetFolder:
    """``datasets``' ``save_to_disk`` folder, written to a staging folder beside the target
    (removed whatever happens). On a local disk the finished folder replaces the old one by
    renames, so a failure leaves the old dataset or the new one, never a mix; on an object
    store, which has no folder rename, the files are moved one by one after the old ones go."""

    folder = True

    def write(self, path: str, batches: Iterator[pa.RecordBatch],
              storage_options: dict[str, Any] | None,
              schema: pa.Schema | None = None) -> tuple[str, int]:
        import datasets

        table = pa.Table.from_batches(list(batches), schema=schema)
        if table.num_rows == 0:
            raise ValueError(f"{path}: nothing to export in the hf format: datasets cannot "
                             "load a save_to_disk folder of zero rows back; nothing written")
        dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
        options = fs_options(path, storage_options)
        fs, fs_path = fsspec.core.url_to_fs(path, **options)
        fs_path = fs_path.rstrip("/")
        staging = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            dataset.save_to_disk(fs.unstrip_protocol(staging), storage_options=options or None)
            if "file" in fs.protocol:
                old = f"{fs_path}.old-{uuid.uuid4().hex[:8]}"
                if fs.exists(fs_path):
                    fs.mv(fs_path, old, recursive=True)
                fs.mv(staging, fs_path, recursive=True)
                if fs.exists(old):
                    fs.rm(old, recursive=True)
            else:
                if fs.exists(fs_path):
                    fs.rm(fs_path, recursive=True)
                for written in fs.find(staging):
                    target = posixpath.join(fs_path, posixpath.relpath(written, staging))
                    fs.mv(written, target)
        finally:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        return fs.unstrip_protocol(fs_path), table.num_rows


register("export_format", "hf")(HFDatasetFolder())


def write_dataset(
    data: Data,
    path: str,
    fmt: str | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_rows: int = 10_000,
) -> dict[str, Any]:
    """Write examples to ``path`` (local or any fsspec URL) in a registered export format."""
    fmt = fmt or infer_format(path)
    writer = registry("export_format").get(fmt)
    if getattr(writer, "folder", False):
        written, rows = writer.write(path, record_batches(data, batch_rows), storage_options,
                                     getattr(data, "schema", None))
        return {"path": written, "format": fmt, "rows": rows}
    fs, fs_path = fsspec.core.url_to_fs(path, **fs_options(path, storage_options))
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    batches = record_batches(data, batch_rows)
    with fs.transaction, fs.open(fs_path, "wb") as handle:
        rows = writer(handle, batches)
    return {"path": fs.unstrip_protocol(fs_path), "format": fmt, "rows": rows}
