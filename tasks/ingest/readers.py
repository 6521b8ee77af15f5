"""Streaming readers: a source URL becomes a stream of raw records, never a whole file in memory.

Every reader yields ``(row, value, problem, raw)`` tuples:

- ``row``: where the record sits in its file. Line number (from 1) for the
  line-oriented formats (JSONL, CSV); element/row index (from 0) for JSON
  arrays and Parquet, like ``jq '.[i]'`` and ``pyarrow`` count them.
- ``value``: the parsed record (usually a dict) or ``None`` when it could not
  be parsed;
- ``problem``: ``None``, or a :class:`Problem` saying why the record is lost
  (it goes to quarantine, never silently away);
- ``raw``: the record's source text when the reader has it for free (JSONL),
  for the quarantine excerpt.

Bytes are decoded with ``surrogateescape`` so an invalid UTF-8 byte costs one
record (the validator finds it in the field it landed in), not the file.
A JSON array is parsed element by element with the C decoder's
``raw_decode`` over a sliding buffer, so a cut-off array still yields every
element before the cut.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

CHUNK_BYTES = 1 << 20
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma"}
KIND_BY_SUFFIX = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
KINDS = ("json", "jsonl", "parquet", "csv", "tsv")
_GLOB_CHARS = re.compile(r"[*?\[]")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_AFTER_ELEMENT = re.compile(r"[ \t\n\r]*([,\]])?")
_SCALAR_END = frozenset(" \t\n\r,]")


class SourceError(Exception):
    """A source that cannot be read at all: the run stops with a message naming it."""


@dataclass(frozen=True)
class Problem:
    """Why one record goes to quarantine: a short stable code, the field, a plain reason."""

    code: str
    field: str | None
    reason: str


Item = tuple[int, Any, "Problem | None", "str | None"]


# ---- sources -----------------------------------------------------------------


def fs_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for a URL: ``endpoint_url`` is an S3 client setting (as in the store)."""
    opts = dict(options or {})
    endpoint = opts.pop("endpoint_url", None)
    if endpoint and url.startswith(("s3://", "s3a://")):
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    return opts


@dataclass(frozen=True)
class SourceFile:
    """One concrete file to read: its display URL and how to open it."""

    url: str
    fs: Any
    path: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def _display(fs: Any, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def kind_from_name(name: str) -> str | None:
    """File type from the name, ignoring a compression suffix (``x.jsonl.gz`` is JSONL)."""
    stem, suffix = posixpath.splitext(name.lower())
    if suffix in COMPRESSION_SUFFIXES:
        stem, suffix = posixpath.splitext(stem)
    return KIND_BY_SUFFIX.get(suffix)


def expand_sources(
    sources: Sequence[str], options: dict[str, Any] | None = None
) -> list[SourceFile]:
    """Paths, globs, folders and fsspec URLs -> the files to read, in a stable order.

    Anything that names nothing stops the run before a byte is written, naming it."""
    files: list[SourceFile] = []
    seen: set[str] = set()
    for source in sources:
        try:
            remote = "://" in source and not source.startswith("file://")
            opts = fs_options(source, options) if remote else {}
            fs, path = fsspec.core.url_to_fs(source, **opts)
        except (ImportError, ValueError) as error:
            raise SourceError(f"cannot open {source}: {error}") from error
        try:
            if _GLOB_CHARS.search(path):
                matches = fs.glob(path, detail=True)
                paths = sorted(p for p, info in matches.items() if info.get("type") != "directory")
                if not paths:
                    raise SourceError(f"cannot open {source}: no file matches this pattern")
            elif fs.isdir(path):
                paths = sorted(p for p in fs.find(path) if kind_from_name(p))
                if not paths:
                    raise SourceError(
                        f"cannot open {source}: the folder holds no .json/.jsonl/.parquet/.csv file"
                    )
            elif fs.exists(path):
                paths = [path]
            else:
                raise SourceError(f"cannot open {source}: no such file")
        except SourceError:
            raise
        except (OSError, PermissionError) as error:
            raise SourceError(f"cannot open {source}: {error}") from error
        for path in paths:
            url = _display(fs, path)
            if url not in seen:
                seen.add(url)
                files.append(SourceFile(url=url, fs=fs, path=path))
    return files


def open_binary(source: SourceFile, compression: str | None = "infer") -> IO[bytes]:
    try:
        return source.fs.open(source.path, "rb", compression=compression)
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot open {source.url}: {error}") from error


def sniff_kind(source: SourceFile) -> str:
    """The file type: from the name, else from the first bytes."""
    kind = kind_from_name(source.name)
    if kind and kind != "json":
        return kind
    with open_binary(source) as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        return "jsonl"
    if kind == "json":  # empty or odd .json: the array reader says what is wrong with it
        return "json"
    raise SourceError(
        f"cannot read {source.url}: not a JSON array, JSON lines, Parquet or CSV file "
        "(name it .json, .jsonl, .parquet or .csv)"
    )


def read_source(
    source: SourceFile, max_record_bytes: int, batch_rows: int = 10_000
) -> Iterator[Item]:
    """Every record of one file, streamed."""
    kind = sniff_kind(source)
    if kind == "parquet":
        yield from read_parquet(source, batch_rows)
        return
    with open_binary(source) as handle:
        if kind == "json":
            yield from read_json_array(handle, max_record_bytes)
        elif kind == "jsonl":
            yield from read_jsonl(handle, max_record_bytes)
        else:
            yield from read_csv(handle, max_record_bytes, delimiter="\t" if kind == "tsv" else ",")


# ---- JSON lines --------------------------------------------------------------

_DECODER = json.JSONDecoder(strict=False)  # raw control characters inside strings are common


def read_jsonl(handle: IO[bytes], max_record_bytes: int) -> Iterator[Item]:
    loads = _DECODER.decode
    records = 0
    for lineno, line in enumerate(handle, 1):
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        line = line.strip()
        if not line:
            continue
        records += 1
        if len(line) > max_record_bytes:
            yield (
                lineno,
                None,
                Problem(
                    "too_large",
                    None,
                    f"line is {len(line):,} bytes, over the {max_record_bytes:,}-byte limit "
                    "(ingest.max_record_bytes)",
                ),
                line[:2000].decode("utf-8", "surrogateescape"),
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "surrogateescape")  # the validator names the field
        try:
            value = loads(text)
        except json.JSONDecodeError as error:
            yield (
                lineno,
                None,
                Problem(
                    "invalid_json", None, f"not valid JSON: {error.msg} (column {error.colno})"
                ),
                text,
            )
            continue
        yield lineno, value, None, text
    if records == 0:
        yield 0, None, Problem("empty_file", None, "empty file: no records"), None


# ---- JSON arrays -------------------------------------------------------------


class _Buffer:
    """Decoded text of a byte stream, read on demand; tracks line numbers for messages."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.text = ""
        self.pos = 0
        self.eof = False
        self.lines_dropped = 0  # newlines in text already discarded

    def fill(self, size: int | None = None) -> bool:
        """Append the next chunk (at least ``size`` bytes); False at end of file."""
        if self.eof:
            return False
        if self.pos > CHUNK_BYTES:  # drop what is parsed, so memory stays ~ one chunk + a record
            self.lines_dropped += self.text.count("\n", 0, self.pos)
            self.text = self.text[self.pos :]
            self.pos = 0
        chunk = self.handle.read(max(size or 0, CHUNK_BYTES))
        if not chunk:
            self.eof = True
            self.text += self.decoder.decode(b"", final=True)
            return False
        self.text += self.decoder.decode(chunk)
        return True

    def skip_whitespace(self) -> bool:
        """Move past whitespace; False when the file ends first."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return True
            if not self.fill():
                return False

    def line(self, pos: int | None = None) -> int:
        return self.lines_dropped + self.text.count("\n", 0, self.pos if pos is None else pos) + 1

    def excerpt(self, limit: int = 2000) -> str:
        return self.text[self.pos : self.pos + limit]


def read_json_array(handle: IO[bytes], max_record_bytes: int) -> Iterator[Item]:
    buf = _Buffer(handle)
    raw_decode = _DECODER.raw_decode
    if not buf.skip_whitespace():
        yield 0, None, Problem("empty_file", None, "empty file: no records"), None
        return
    if buf.text[buf.pos] != "[":
        yield (
            0,
            None,
            Problem(
                "invalid_json",
                None,
                f"not a JSON array: the file starts with {buf.text[buf.pos]!r} "
                f"at line {buf.line()} (JSON lines belong in a .jsonl file)",
            ),
            buf.excerpt(),
        )
        return
    buf.pos += 1
    if not buf.skip_whitespace():
        yield (
            0,
            None,
            Problem("truncated", None, "JSON array cut off: the file ends after '['"),
            None,
        )
        return
    if buf.text[buf.pos] == "]":
        yield (
            0,
            None,
            Problem("empty_file", None, "empty file: the JSON array has no records"),
            None,
        )
        return
    index = 0
    while True:
        if not buf.skip_whitespace():
            yield (
                index,
                None,
                Problem(
                    "truncated", None, f"JSON array cut off: the file ends before element {index}"
                ),
                None,
            )
            return
        try:
            value, end = raw_decode(buf.text, buf.pos)
            if (
                not buf.eof
                and not isinstance(value, dict | list | str)
                and (end == len(buf.text) or buf.text[end] not in _SCALAR_END)
            ):  # a number cut by the chunk edge ("-0" of "-0.25") parses: read on, parse again
                raise json.JSONDecodeError("value may continue", buf.text, end)
        except json.JSONDecodeError as error:
            pending = len(buf.text) - buf.pos
            if not buf.eof and pending <= max_record_bytes:
                buf.fill(pending)  # grow geometrically: big records parse O(n)
                continue  # the element may just run past the buffer: parse again with more text
            yield index, None, _array_error(buf, index, error, max_record_bytes), buf.excerpt()
            return
        yield index, value, None, None
        buf.pos = end
        while True:
            match = _AFTER_ELEMENT.match(buf.text, buf.pos)
            if match.group(1) or buf.eof or match.end() < len(buf.text):
                break
            buf.fill()
        delimiter = match.group(1)
        if delimiter == ",":
            buf.pos = match.end()
            index += 1
            continue
        if delimiter == "]":
            buf.pos = match.end()
            if buf.skip_whitespace():
                yield (
                    index + 1,
                    None,
                    Problem(
                        "invalid_json",
                        None,
                        f"unexpected text after the end of the JSON array at line {buf.line()}",
                    ),
                    buf.excerpt(),
                )
            return
        buf.pos = match.end()
        if buf.eof and buf.pos >= len(buf.text):
            yield (
                index + 1,
                None,
                Problem(
                    "truncated",
                    None,
                    f"JSON array cut off after element {index}: the file ends without ']'",
                ),
                None,
            )
        else:
            yield (
                index + 1,
                None,
                Problem(
                    "invalid_json",
                    None,
                    f"not valid JSON: expected ',' or ']' after element {index} "
                    f"at line {buf.line()}; the rest of the file could not be read",
                ),
                buf.excerpt(),
            )
        return


def _array_error(buf: _Buffer, index: int, error: json.JSONDecodeError, limit: int) -> Problem:
    line = buf.line()
    if not buf.eof:
        return Problem(
            "too_large",
            None,
            f"element {index} at line {line} is not complete within {limit:,} bytes "
            "(ingest.max_record_bytes); the rest of the file could not be read",
        )
    ran_out = error.pos >= len(buf.text) - 1 or error.msg.startswith("Unterminated string")
    if ran_out:
        return Problem(
            "truncated",
            None,
            f"JSON array cut off mid-way: element {index} starting at line {line} is incomplete "
            "(the file ends inside it)",
        )
    return Problem(
        "invalid_json",
        None,
        f"not valid JSON in element {index} at line {buf.line(error.pos)}: {error.msg}; "
        "the rest of the file could not be read",
    )


# ---- Parquet and CSV ---------------------------------------------------------


def read_parquet(source: SourceFile, batch_rows: int) -> Iterator[Item]:
    with open_binary(source, compression=None) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as error:  # pyarrow raises ArrowInvalid/OSError for a bad footer
            raise SourceError(
                f"cannot read {source.url}: not a readable Parquet file ({error})"
            ) from error
        index = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for record in batch.to_pylist():
                yield index, record, None, None
                index += 1
        if index == 0:
            yield (
                0,
                None,
                Problem("empty_file", None, "empty file: the Parquet file has no rows"),
                None,
            )


def read_csv(handle: IO[bytes], max_record_bytes: int, delimiter: str = ",") -> Iterator[Item]:
    csv.field_size_limit(max(max_record_bytes, csv.field_size_limit()))
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text, delimiter=delimiter, restkey="_extra_columns")
    rows = 0
    start = 2  # the header is line 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            rows += 1
            yield start, None, Problem("invalid_csv", None, f"not valid CSV: {error}"), None
            start = reader.line_num + 1
            continue
        rows += 1
        yield start, record, None, None
        start = reader.line_num + 1
    if rows == 0:
        yield 0, None, Problem("empty_file", None, "empty file: no CSV rows"), None
