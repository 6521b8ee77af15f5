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
    """Which cache files each pending batch should read, and how many of its ids they hold.

    One pass per cache file over its ``id`` column (positions of its ids among the wanted
    ones), so memory stays a few bytes per wanted id whatever the cache's size.
    """
    files = cache_files(store, directory)
    if not files or not batch_ids:
        return CacheLookup({}, {})
    wanted = pa.concat_arrays([a.cast(pa.string()) for a in batch_ids.values()])
    batch_of = np.repeat(np.fromiter(batch_ids, dtype=np.int64, count=len(batch_ids)),
                         [len(a) for a in batch_ids.values()])
    hit = np.zeros(len(wanted), dtype=bool)
    out_files: dict[int, list[str]] = {}
    for path in files:
        ids = store.dataset([path]).to_table(columns=["id"]).column("id").combine_chunks()
        positions = pc.index_in(ids, value_set=wanted).drop_null().to_numpy()
        if positions.size:
            hit[positions] = True
            for batch in np.unique(batch_of[positions]).tolist():
                out_files.setdefault(batch, []).append(path)
    counts = np.bincount(batch_of[hit], minlength=int(batch_of.max()) + 1) if hit.any() else []
    hits = {b: int(counts[b]) for b in out_files}
    pa.default_memory_pool().release_unused()
    return CacheLookup(out_files, hits)


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
