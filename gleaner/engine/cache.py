"""The cross-run cache of a stage: ok rows by (example id, stage key).

Rows a stage made with settings ``key`` are interchangeable across runs for the
same example id (the id is a content hash), so a refresh that changed 5 % of a
pool pays for 5 %. Workers write their fresh ok rows as one file per batch
(before the batch's part, so a crash between the two costs nothing); the driver
reads only the ``id`` column of the cache files to tell each batch which files
hold some of its ids, and the worker reads those rows itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.store import Store


@dataclass
class CacheLookup:
    """For each batch index: the cache files holding some of its ids, and how many ids."""

    files: dict[int, list[str]]
    hits: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.hits.values())


def cache_files(store: Store, directory: str) -> list[str]:
    try:
        entries = store.fs.ls(directory, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if p.endswith(".parquet") and "/.tmp-" not in p)


def lookup(store: Store, directory: str, batch_ids: dict[int, pa.Array]) -> CacheLookup:
    """Which cache files each pending batch should read (newest file wins for an id)."""
    files = cache_files(store, directory)
    if not files or not batch_ids:
        return CacheLookup({}, {})
    wanted = pa.concat_arrays([a.cast(pa.string()) for a in batch_ids.values()])
    batch_of = pa.array(np.repeat(np.fromiter(batch_ids, dtype=np.int64, count=len(batch_ids)),
                                  [len(a) for a in batch_ids.values()]))
    cached: list[pa.Table] = []
    for number, path in enumerate(files):
        ids = store.dataset([path]).to_table(columns=["id"]).column("id")
        ids = ids.filter(pc.is_in(ids, value_set=wanted))
        if len(ids):
            cached.append(pa.table({"id": ids, "file": pa.array([number] * len(ids), pa.int64())}))
    if not cached:
        return CacheLookup({}, {})
    newest = pa.concat_tables(cached).group_by("id").aggregate([("file", "max")])
    joined = pa.table({"id": wanted, "batch": batch_of}).join(newest, "id", join_type="inner")
    # one row per (batch, file): small whatever the pool's size
    pairs = joined.group_by(["batch", "file_max"]).aggregate([("id", "count")])
    out_files: dict[int, list[str]] = {}
    hits: dict[int, int] = {}
    for batch, file, count in zip(pairs.column("batch").to_pylist(),
                                  pairs.column("file_max").to_pylist(),
                                  pairs.column("id_count").to_pylist(), strict=True):
        out_files.setdefault(batch, []).append(files[file])
        hits[batch] = hits.get(batch, 0) + count
    return CacheLookup({b: sorted(fs) for b, fs in out_files.items()}, hits)


def read_cached(store: Store, files: list[str], ids: pa.Array, schema: pa.Schema) -> pa.Table:
    """The cached ok rows of ``ids`` from ``files`` (the newest file wins for a repeated id)."""
    if not files:
        return schema.empty_table()
    tables = [store.dataset([f], schema=schema).to_table(filter=pc.field("id").isin(ids))
              for f in files]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return table
    # keep the last occurrence of each id: files are in name order, later files newer
    position = pa.array(range(table.num_rows), pa.int64())
    last = (table.select(["id"]).append_column("position", position)
            .group_by("id").aggregate([("position", "max")]).column("position_max"))
    return table.take(pc.sort_indices(last))


def write_fresh(store: Store, directory: str, run_id: str, index: int, fresh: pa.Table) -> None:
    ok = fresh.filter(pc.equal(fresh["status"], "ok"))
    if ok.num_rows:
        store.write_table(layout.cache_file(directory, run_id, index), ok)
