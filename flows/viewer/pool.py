"""A run's pool, read in place for the viewer: a narrow index in memory, text by position.

The index holds one row per ingested example and only what filters and sorts need: the id,
where the example lies (part, row) in the ingest parts and in every stage that holds a row
for it, each registered signal's number, each stage's status, the selection's reason family
and ``selected``, the pool stages' drop marks and the person's review (excluded, flagged).
No text is held: a page reads its rows' text (and a stage's raw answer, error, labels) from
the row groups that hold them, so a page of 50 reads a few row groups whatever the pool's
size. Full-text search scans the ingest parts one row group at a time and keeps the matching
rows as a bit mask (a few recent searches). The index is rebuilt when a stage's parts change.
"""

from __future__ import annotations

import math
import posixpath
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gleaner import layout
from gleaner.store import Store
from gleaner.tasks.select.review import EXCLUDED, REVIEW, flag_records, review_log
from gleaner.tasks.select.review import exclusion_records as exclusions

TEXT_COLUMNS = ("instruction", "input", "output")
PREVIEW_CHARS = 400  # the pool table's text cells; an example's page shows everything
MAX_PAGE = 200
SEARCH_CACHE = 4
# columns an example's page never shows (numbers of a vector, MinHash signatures)
BULKY = ("vector", "signature", "bands")


@dataclass(frozen=True)
class Field:
    """Something a pool row can be filtered or sorted by."""

    name: str  # the query's name: a signal (rating), status:<stage>, reason, selected ...
    kind: str  # number | category | bool
    stage: str  # the stage whose rows hold it
    column: str  # that stage's column
    title: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "title": self.title}


@dataclass
class Source:
    """One stage joined onto the pool by example id."""

    stage: str
    parts: dict[int, str]
    fields: list[Field]
    page_columns: list[str]  # read for every row of a page (errors, labels, full reason)
    columns: list[str] = field(default_factory=list)  # everything it holds


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def cut(text: Any, limit: int = PREVIEW_CHARS) -> Any:
    if isinstance(text, str) and len(text) > limit:
        return text[:limit] + "…"
    return text


class PartReader:
    """Rows of Parquet parts by (part, row), reading only the row groups that hold them."""

    def __init__(self, store: Store):
        self.store = store
        self._meta: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _metadata(self, path: str) -> tuple[Any, np.ndarray]:
        with self._lock:
            if path in self._meta:
                self._meta.move_to_end(path)
                return self._meta[path]
        with self.store.fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
        starts = np.cumsum([0] + [metadata.row_group(i).num_rows
                                  for i in range(metadata.num_row_groups)])
        with self._lock:
            self._meta[path] = (metadata, starts)
            while len(self._meta) > 4096:
                self._meta.popitem(last=False)
        return metadata, starts

    def read(self, path: str, rows: Sequence[int], columns: Sequence[str]) -> list[dict[str, Any]]:
        """The given rows of one part (in the order asked), only ``columns``."""
        metadata, starts = self._metadata(path)
        rows = np.asarray(rows, dtype=np.int64)
        groups = np.searchsorted(starts, rows, side="right") - 1
        present = set(metadata.schema.to_arrow_schema().names)
        wanted = [c for c in columns if c in present]
        out: list[dict[str, Any]] = [{} for _ in rows]
        with self.store.fs.open(path, "rb") as handle:
            reader = pq.ParquetFile(handle, metadata=metadata)
            for group in np.unique(groups):
                where = np.flatnonzero(groups == group)
                table = reader.read_row_group(int(group), columns=wanted)
                picked = table.take(pa.array(rows[where] - starts[group])).to_pylist()
                for slot, row in zip(where, picked, strict=True):
                    out[slot] = row
        return out


def stage_parts(store: Store, run_id: str, stage: str) -> dict[int, str]:
    return store.part_paths(store.stage_path(run_id, stage))


def part_schema(store: Store, path: str) -> pa.Schema:
    with store.fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


_HEX = np.full(256, 255, np.uint8)
for _value, _char in enumerate(b"0123456789abcdef"):
    _HEX[_char] = _value
ID_BYTES = pa.binary(16)


def compact_ids(array: pa.Array) -> pa.Array:
    """Example ids (32 lowercase hex digits: gleaner.schema.example_id) as 16 bytes each, so
    a million ids take 16 MB; any other id is kept as it is."""
    if not pa.types.is_string(array.type) or array.null_count or len(array) == 0:
        return array
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:
                                                          array.offset + len(array) + 1]
    if not np.all(np.diff(offsets) == 32):
        return array
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    nibbles = _HEX[data.reshape(-1, 32)]
    if (nibbles == 255).any():
        return array
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return pa.FixedSizeBinaryArray.from_buffers(ID_BYTES, len(array),
                                                [None, pa.py_buffer(packed.tobytes())])


HEX_ID = re.compile(r"[0-9a-f]{32}")


def id_text(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


class Codes:
    """A category column kept as int32 codes into one dictionary, batch by batch."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.chunks: list[np.ndarray] = []

    def add(self, array: pa.Array, family: bool = False) -> None:
        if family:
            array = reason_family(array)
        encoded = pc.dictionary_encode(array)
        local = np.array([self.values.setdefault(str(v), len(self.values))
                          for v in encoded.dictionary.to_pylist()] + [-1], np.int32)
        indices = np.asarray(pc.fill_null(encoded.indices, -1), dtype=np.int64)
        self.chunks.append(local[indices])

    def array(self) -> pa.Array:
        codes = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0),
                                              pa.array(list(self.values), pa.string()))


def _narrow(store: Store, parts: dict[int, str], fields: Sequence[Field]) -> dict[str, pa.Array]:
    """The id, the ``fields`` and each row's (part, row) of every part of a stage, read a row
    group at a time and kept compact (ids as bytes, categories as codes, numbers as floats)."""
    ids: list[pa.Array] = []
    numbers: dict[str, list[np.ndarray]] = {f.name: [] for f in fields if f.kind == "number"}
    flags: dict[str, list[pa.Array]] = {f.name: [] for f in fields if f.kind == "bool"}
    codes = {f.name: Codes() for f in fields if f.kind == "category"}
    part_numbers, rows = [], []
    columns = list(dict.fromkeys(["id", *(f.column for f in fields)]))
    for number, path in parts.items():
        with store.fs.open(path, "rb") as handle:
            reader = pq.ParquetFile(handle)
            n = reader.metadata.num_rows
            part_numbers.append(np.full(n, number, np.int32))
            rows.append(np.arange(n, dtype=np.int32))
            for batch in reader.iter_batches(batch_size=65536, columns=columns):
                ids.append(compact_ids(batch.column("id")))
                for f in fields:
                    column = batch.column(f.column)
                    if f.kind == "number":
                        numbers[f.name].append(np.asarray(pc.fill_null(pc.cast(
                            column, pa.float64()), np.nan), dtype=np.float64))
                    elif f.kind == "bool":
                        flags[f.name].append(pc.fill_null(column, False))
                    else:
                        codes[f.name].add(column, family=f.name == "reason")
    if len({chunk.type for chunk in ids}) > 1:  # some ids are not example hashes: all as text
        ids = [pa.array([id_text(v) for v in chunk.to_pylist()], pa.string()) for chunk in ids]
    out: dict[str, pa.Array] = {
        "id": pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
        "#part": pa.array(np.concatenate(part_numbers) if part_numbers else [], pa.int32()),
        "#row": pa.array(np.concatenate(rows) if rows else [], pa.int32())}
    for name, chunks in numbers.items():
        values = np.concatenate(chunks) if chunks else np.zeros(0)
        out[name] = pa.array(values, pa.float64(), mask=np.isnan(values))
    for name, chunks in flags.items():
        out[name] = pa.concat_arrays(chunks) if chunks else pa.array([], pa.bool_())
    for name, category in codes.items():
        out[name] = category.array()
    return out


def reason_family(reasons: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``too_similar:<id>`` -> ``too_similar`` (a drop's detail follows the colon)."""
    return pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0)


def _lookup(ids: pa.Array, stage_ids: pa.Array) -> pa.Array | None:
    """Where each pool id lies in a stage's rows: None when the stage holds the pool's ids
    in the pool's order (a stage written batch by batch over the ingest, the manifest),
    else the positions (null: no row for that example)."""
    if stage_ids.type != ids.type:  # ids of another form than the pool's: compare as text
        stage_ids = pa.array([id_text(v) for v in stage_ids.to_pylist()], pa.string())
        ids = pa.array([id_text(v) for v in ids.to_pylist()], pa.string())
    if len(stage_ids) == len(ids) and pc.all(pc.equal(stage_ids, ids)).as_py() is not False:
        return None
    return pc.index_in(ids, value_set=stage_ids)


def _take(values: pa.Array, where: pa.Array | None) -> pa.Array:
    return values if where is None else values.take(where)


class RunPool:
    """The viewer's read of one run: the index, queries over it, pages and examples."""

    def __init__(self, store: Store, run_id: str, refresh_s: float = 3.0):
        self.store, self.run_id, self.refresh_s = store, run_id, refresh_s
        self.reader = PartReader(store)
        self._lock = threading.RLock()
        self._checked = 0.0
        self._versions: dict[str, str | None] = {}
        self._searches: OrderedDict[str, np.ndarray] = OrderedDict()
        self.index: pa.Table = pa.table({})
        self.sources: dict[str, Source] = {}
        self.fields: dict[str, Field] = {}
        self.build()

    # ---- what the run holds -----------------------------------------------------------
    def _source_specs(self) -> dict[str, Source]:
        """Every stage the run holds that adds something per example, with its fields."""
        from gleaner.engine.catalog import drops
        from gleaner.registry import registry

        store, run_id = self.store, self.run_id
        specs: dict[str, Source] = {}

        def source(stage: str) -> Source | None:
            if stage not in specs:
                parts = stage_parts(store, run_id, stage)
                if not parts:
                    return None
                names = part_schema(store, next(iter(parts.values()))).names
                fields = ([Field(f"status:{stage}", "category", stage, "status",
                                 f"{stage} status")] if "status" in names else [])
                page = ["status", "error"] if "status" in names else []
                specs[stage] = Source(stage, parts, fields, [c for c in page if c in names],
                                      [c for c in names if c not in BULKY])
            return specs[stage]

        for name, signal in registry("signal").items():
            found = source(signal.stage)
            if found is None or signal.column not in found.columns:
                continue
            if signal.labels:
                found.page_columns.append(signal.column)
            else:
                found.fields.append(Field(name, "number", signal.stage, signal.column,
                                          signal.title))
        for drop in drops():
            found = source(drop.stage)
            if found is None or drop.column not in found.columns:
                continue
            found.fields.append(Field(drop.reason, "bool", drop.stage, drop.column,
                                      f"{drop.reason} ({drop.stage})"))
            if drop.detail and drop.detail in found.columns:
                found.page_columns.append(drop.detail)
        manifest = source(layout.SELECT)
        if manifest is not None:
            manifest.fields += [Field("selected", "bool", layout.SELECT, "selected", "selected"),
                                Field("reason", "category", layout.SELECT, "reason",
                                      "selection reason")]
            manifest.page_columns += ["reason", "score", "rank"]
        return specs

    def versions(self) -> dict[str, str | None]:
        stages = [layout.INGEST, *self.sources, REVIEW]
        return {stage: self.store.stage_version(self.run_id, stage) for stage in stages}

    def build(self) -> None:
        """(Re)build the index from the store: ids and positions, then each stage's fields."""
        store, run_id = self.store, self.run_id
        parts = stage_parts(store, run_id, layout.INGEST)
        if not parts:
            raise FileNotFoundError(f"run {run_id!r} has no ingested examples in "
                                    f"{store.uri(store.root)}")
        sources = self._source_specs()
        pool = _narrow(store, parts, [])
        ids = pool["id"]
        index = pa.table({"id": ids, "#part": pool["#part"], "#row": pool["#row"]})
        del pool
        fields: dict[str, Field] = {}
        for source in sources.values():
            table = _narrow(store, source.parts, source.fields)
            where = _lookup(ids, table["id"])
            for f in source.fields:
                fields[f.name] = f
                index = index.append_column(f.name, _take(table[f.name], where))
            for column in ("#part", "#row"):
                index = index.append_column(f"{source.stage}{column}",
                                            _take(table[column], where))
            del table, where
        for f in (Field("excluded", "bool", REVIEW, "excluded", "excluded by a person"),
                  Field("flagged", "bool", REVIEW, "flagged", "flagged by a person")):
            fields[f.name] = f
        with self._lock:
            self.sources, self.fields = sources, fields
            self.index = index.combine_chunks()
            self._searches.clear()
            del index
            self._review()
            self._versions = self.versions()
            self._checked = time.monotonic()
        pa.default_memory_pool().release_unused()  # the build's scratch, back to the system

    def _review(self) -> None:
        ids = self.index["id"]
        excluded = self.keys([r["id"] for r in exclusions(self.store, self.run_id)])
        flagged = self.keys([r["id"] for r in flag_records(self.store, self.run_id)])
        for name, values in (("excluded", excluded), ("flagged", flagged)):
            column = pc.is_in(ids, value_set=values)
            if name in self.index.column_names:
                self.index = self.index.set_column(self.index.column_names.index(name), name,
                                                   column)
            else:
                self.index = self.index.append_column(name, column)

    def keys(self, ids: Sequence[str]) -> pa.Array:
        """Example ids as the index holds them (bytes, or text when they are not hashes)."""
        if self.index["id"].type == ID_BYTES:
            return pa.array([bytes.fromhex(i) if HEX_ID.fullmatch(i) else None for i in ids],
                            ID_BYTES)
        return pa.array(list(ids), pa.string())

    def known(self, ids: Sequence[str]) -> bool:
        """Whether every one of ``ids`` is an example of the pool."""
        wanted = set(ids)
        hits = pc.sum(pc.is_in(self.index["id"], value_set=self.keys(sorted(wanted)))).as_py()
        return hits == len(wanted)

    def refresh(self, force: bool = False) -> None:
        """Rebuild when a stage's parts changed (looked at every ``refresh_s`` at most)."""
        if not force and time.monotonic() - self._checked < self.refresh_s:
            return
        with self._lock:
            now = self.versions()
            self._checked = time.monotonic()
            if now == self._versions:
                return
            if all(now[s] == self._versions.get(s) for s in now if s != REVIEW):
                self._review()
                self._versions = now
                return
        self.build()

    # ---- queries ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        index = self.index
        categories: dict[str, dict[str, int]] = {}
        for f in self.fields.values():
            if f.kind == "category" and f.name in index.column_names:
                counts = pc.value_counts(index[f.name]).to_pylist()
                categories[f.name] = {str(c["values"]): c["counts"] for c in counts}
        numbers = {}
        for f in self.fields.values():
            if f.kind == "number":
                bounds = pc.min_max(index[f.name]).as_py()
                numbers[f.name] = {"min": _json(bounds["min"]), "max": _json(bounds["max"]),
                                   "n": index[f.name].length() - index[f.name].null_count}
        return {"run_id": self.run_id, "examples": index.num_rows,
                "stages": sorted(self.sources), "fields": [f.as_dict() for f in
                                                           self.fields.values()],
                "categories": categories, "numbers": numbers,
                "excluded": int(pc.sum(index["excluded"]).as_py() or 0),
                "flagged": int(pc.sum(index["flagged"]).as_py() or 0)}

    def mask(self, ranges: Iterable[tuple[str, float | None, float | None]] = (),
             equals: Iterable[tuple[str, str]] = (), search: str | None = None
             ) -> pa.Array | None:
        """Rows matching every condition (None: all rows). ``equals``: (field, value): a
        category's value (a reason's family), ``true``/``false`` of a bool field."""
        index, conditions = self.index, []
        for name, low, high in ranges:
            f = self._field(name, "number")
            if low is not None:
                conditions.append(pc.greater_equal(index[name], low))
            if high is not None:
                conditions.append(pc.less_equal(index[name], high))
        by_field: dict[str, list[str]] = {}
        for name, value in equals:
            by_field.setdefault(name, []).append(value)
        for name, values in by_field.items():
            f = self._field(name)
            if f.kind == "bool":
                wanted = {v.lower() in ("true", "1", "yes") for v in values}
                column = pc.fill_null(index[name], False)
                conditions.append(column if wanted == {True} else pc.invert(column)
                                  if wanted == {False} else pc.is_valid(column))
            else:
                column = index[name]
                if pa.types.is_dictionary(column.type):
                    column = column.cast(column.type.value_type)
                conditions.append(pc.is_in(column, value_set=pa.array(values, pa.string())))
        if search:
            conditions.append(pa.array(self.search(search)))
        if not conditions:
            return None
        combined = conditions[0]
        for condition in conditions[1:]:
            combined = pc.and_(combined, condition)
        return pc.fill_null(combined, False)

    def _field(self, name: str, kind: str | None = None) -> Field:
        f = self.fields.get(name)
        if f is None or (kind is not None and f.kind != kind):
            known = ", ".join(n for n, g in self.fields.items() if kind in (None, g.kind))
            raise KeyError(f"no {kind or ''} field {name!r} in this run; known: {known}")
        return f

    def search(self, text: str) -> np.ndarray:
        """Rows whose instruction, input or response holds ``text`` (any case)."""
        key = text.casefold()
        with self._lock:
            if key in self._searches:
                self._searches.move_to_end(key)
                return self._searches[key]
        hits = []
        for path in stage_parts(self.store, self.run_id, layout.INGEST).values():
            with self.store.fs.open(path, "rb") as handle:
                reader = pq.ParquetFile(handle)
                for group in range(reader.num_row_groups):
                    table = reader.read_row_group(group, columns=list(TEXT_COLUMNS))
                    found = None
                    for column in TEXT_COLUMNS:
                        match = pc.match_substring(table[column], text, ignore_case=True)
                        found = match if found is None else pc.or_(found, match)
                    hits.append(np.asarray(pc.fill_null(found, False)))
        mask = np.concatenate(hits) if hits else np.zeros(0, bool)
        if mask.size != self.index.num_rows:  # the parts changed under us: rebuild first
            self.refresh(force=True)
            return self.search(text)
        with self._lock:
            self._searches[key] = mask
            while len(self._searches) > SEARCH_CACHE:
                self._searches.popitem(last=False)
        return mask

    def query(self, ranges: Sequence[tuple[str, float | None, float | None]] = (),
              equals: Sequence[tuple[str, str]] = (), search: str | None = None,
              sort: str | None = None, descending: bool = False, offset: int = 0,
              limit: int = 50) -> dict[str, Any]:
        """One page of the pool: the rows matching, in order, with their text and fields."""
        self.refresh()
        limit = max(1, min(int(limit), MAX_PAGE))
        offset = max(0, int(offset))
        with self._lock:
            index = self.index
            mask = self.mask(ranges, equals, search)
            rows = (np.arange(index.num_rows) if mask is None
                    else np.flatnonzero(np.asarray(mask)))
            if sort:
                self._field(sort)
                values = index[sort].take(pa.array(rows))
                if pa.types.is_dictionary(values.type):
                    values = values.cast(values.type.value_type)
                order = pc.array_sort_indices(values, order="descending" if descending
                                              else "ascending", null_placement="at_end")
                rows = rows[np.asarray(order)]
            page = rows[offset:offset + limit]
            picked = index.take(pa.array(page, pa.int64())) if page.size else index.slice(0, 0)
        return {"total": int(rows.size), "offset": offset, "limit": limit,
                "rows": self.rows(picked, preview=True)}

    def rows(self, picked: pa.Table, preview: bool) -> list[dict[str, Any]]:
        """The index rows ``picked`` with their text and each stage's page columns."""
        out = []
        for row in picked.to_pylist():
            record = {"id": id_text(row["id"]), "excluded": bool(row["excluded"]),
                      "flagged": bool(row["flagged"]), "fields": {}, "stages": {}}
            for name, f in self.fields.items():
                if name in row and f.kind != "category" and name not in ("excluded", "flagged"):
                    record["fields"][name] = _json(row[name])
                elif f.kind == "category":
                    record["fields"][name] = row.get(name)
            out.append(record)
        texts = self._read(picked, layout.INGEST, "#part", "#row",
                           [*TEXT_COLUMNS, "source", "source_row"]
                           + ([] if preview else ["conversation", "metadata"]))
        for record, text in zip(out, texts, strict=True):
            for key, value in text.items():
                record[key] = cut(value) if preview and key in TEXT_COLUMNS else _json(value)
        for stage, source in self.sources.items():
            columns = source.page_columns if preview else source.columns
            if not columns:
                continue
            values = self._read(picked, source.parts, f"{stage}#part", f"{stage}#row",
                                columns)
            for record, value in zip(out, values, strict=True):
                if value:
                    record["stages"][stage] = {k: cut(_json(v), 2000) if preview else _json(v)
                                               for k, v in value.items()}
        return out

    def _read(self, picked: pa.Table, parts: str | dict[int, str], part_column: str,
              row_column: str, columns: list[str]) -> list[dict[str, Any]]:
        if isinstance(parts, str):
            parts = stage_parts(self.store, self.run_id, parts)
        numbers = picked[part_column].to_pylist()
        positions = picked[row_column].to_pylist()
        out: list[dict[str, Any]] = [{} for _ in numbers]
        by_part: dict[int, list[int]] = {}
        for slot, number in enumerate(numbers):
            if number is not None:
                by_part.setdefault(number, []).append(slot)
        for number, slots in by_part.items():
            path = parts.get(number)
            if path is None:
                continue
            found = self.reader.read(path, [positions[s] for s in slots], columns)
            for slot, value in zip(slots, found, strict=True):
                out[slot] = value
        return out

    def example(self, example_id: str) -> dict[str, Any] | None:
        """Everything the run holds about one example, and its review history."""
        self.refresh()
        with self._lock:
            index = self.index
            hit = pc.indices_nonzero(pc.equal(index["id"], self.keys([example_id])[0]))
            if len(hit) == 0:
                return None
            picked = index.take(hit)
        (record,) = self.rows(picked, preview=False)
        log = review_log(self.store, self.run_id)
        log = log.filter(pc.equal(log["id"], example_id))
        record["review"] = [_json(r) for r in log.drop_columns(["status"]).to_pylist()]
        return record

    # ---- counts -----------------------------------------------------------------------
    def histograms(self) -> dict[str, dict[str, Any]]:
        """Per numeric signal: counts per bin over the pool, and over the selected."""
        from gleaner.registry import registry

        signals = dict(registry("signal").items())
        selected = (np.asarray(pc.fill_null(self.index["selected"], False))
                    if "selected" in self.index.column_names else None)
        out = {}
        for name, f in self.fields.items():
            if f.kind != "number" or name not in signals:
                continue
            edges = signals[name].bins()
            values = self.index[name].to_numpy(zero_copy_only=False).astype(np.float64)
            ok = np.isfinite(values)
            clipped = np.clip(values, edges[0], edges[-1])
            pool, _ = np.histogram(clipped[ok], bins=edges)
            entry = {"title": f.title, "edges": [float(e) for e in edges],
                     "pool": pool.tolist(), "n": int(ok.sum())}
            if selected is not None:
                chosen, _ = np.histogram(clipped[ok & selected], bins=edges)
                entry["selected"] = chosen.tolist()
            out[name] = entry
        return out

    def summaries(self) -> dict[str, Any]:
        """Every ``_summary.json`` of the run's stages, by stage (nested stages too)."""
        base = self.store.run_path(self.run_id)
        found = {}
        try:
            paths = self.store.fs.glob(posixpath.join(base, "**", layout.SUMMARY_FILE))
        except FileNotFoundError:
            paths = []
        for path in sorted(paths):
            stage = posixpath.relpath(posixpath.dirname(path), base)
            try:
                found[stage] = self.store.read_json(path)
            except (ValueError, OSError) as error:
                found[stage] = {"error": str(error)}
        return found


def exclusion_records(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The examples a person excluded from the run (id, who, why, at): for provenance."""
    return exclusions(store, run_id)


__all__ = ["EXCLUDED", "Field", "PartReader", "RunPool", "exclusion_records"]
