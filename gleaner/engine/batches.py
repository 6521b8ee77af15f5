"""Cutting a stage's input into batches the workers read for themselves.

The driver never holds the input rows: it reads the input stage's part footers
(row counts) and its ``id`` column, cuts global row ranges of ``batch_size``,
and sends each worker a :class:`BatchSpec` naming the part files and row
ranges of its batch. The worker reads just those rows (the row groups that
overlap them, the columns its stage needs) from the store.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from gleaner.store import Store


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one input part file."""

    path: str
    start: int
    stop: int


@dataclass
class BatchSpec:
    """What a worker needs to do batch ``index``: where its rows are, nothing of the rows."""

    index: int
    segments: list[Segment]
    rows: int
    cache_files: list[str] = field(default_factory=list)  # cache parts holding some of its ids
    retry_part: str | None = None  # --retry-failed: keep this part's ok rows, redo the rest


@dataclass
class InputIndex:
    """The input stage as the driver sees it: part files, their row counts, the ids."""

    stage: str
    paths: list[str]
    counts: list[int]
    ids: pa.Array  # every input row's id, in input order (strings only, no other column)

    @classmethod
    def build(cls, store: Store, run_id: str, stage: str, id_column: str = "id") -> InputIndex:
        parts = store.part_paths(store.stage_path(run_id, stage))
        if not parts:
            raise FileNotFoundError(
                f"run {run_id!r} has no {stage!r} output in {store.uri(store.root)}; "
                f"run that stage first"
            )
        paths = list(parts.values())
        counts = [pq.read_metadata(store.fs.open(p)).num_rows for p in paths]
        ids = store.dataset(paths).to_table(columns=[id_column]).column(id_column)
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
        pa.default_memory_pool().release_unused()  # the scan's buffers: not the driver's to keep
        return cls(stage, paths, counts, ids)

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        """Changes when the input's rows change (ids in order), not when it is merely re-read."""
        digest = hashlib.sha256(str(len(self.ids)).encode())
        for buffer in self.ids.buffers():  # one contiguous array: offsets and bytes of the ids
            if buffer is not None:
                digest.update(memoryview(buffer))
        return digest.hexdigest()[:16]

    def bounds(self, batch_size: int) -> list[tuple[int, int]]:
        n = self.rows
        return [(s, min(s + batch_size, n)) for s in range(0, n, max(1, batch_size))]

    def segments(self, start: int, stop: int) -> list[Segment]:
        """The part files and row ranges covering global rows ``[start, stop)``."""
        offsets = [0]
        for count in self.counts:
            offsets.append(offsets[-1] + count)
        out: list[Segment] = []
        part = bisect.bisect_right(offsets, start) - 1
        while start < stop and part < len(self.paths):
            begin = start - offsets[part]
            end = min(stop, offsets[part + 1]) - offsets[part]
            if end > begin:
                out.append(Segment(self.paths[part], begin, end))
            start = offsets[part] + end
            part += 1
        return out

    def batch_ids(self, start: int, stop: int) -> pa.Array:
        return self.ids.slice(start, stop - start)


def read_segments(store: Store, segments: list[Segment], columns: list[str]) -> pa.Table:
    """The rows of a batch, reading only the row groups that overlap each segment."""
    tables: list[pa.Table] = []
    for segment in segments:
        with store.fs.open(segment.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            groups, first_row, at = [], None, 0
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                if at + size > segment.start and at < segment.stop:
                    groups.append(group)
                    first_row = at if first_row is None else first_row
                at += size
            table = parquet.read_row_groups(groups, columns=columns)
        tables.append(table.slice(segment.start - (first_row or 0), segment.stop - segment.start))
    if not tables:
        raise ValueError("a batch without rows")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
