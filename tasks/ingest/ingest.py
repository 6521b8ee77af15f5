"""The ingest stage: source files -> canonical examples, with quarantine and exact dedup.

Every record read ends in exactly one place: kept (a row of ``runs/<id>/ingest``),
quarantined (a row of ``runs/<id>/quarantine`` with file, row, field and a
plain reason) or a duplicate of an example already kept (same ``id``; a row of
``runs/<id>/duplicates`` says where it was). The summary always satisfies
``read = kept + quarantined + duplicates``.

Memory stays flat: records stream from the readers and leave in Parquet parts
of ``ingest.batch_rows`` rows; only the set of seen ids grows with the input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig, IngestConfig
from gleaner.engine.plan import PlanMismatch
from gleaner.engine.step import Step, run_step
from gleaner.runs import record_run
from gleaner.schema import EXAMPLE_SCHEMA, QUARANTINE_SCHEMA, Example
from gleaner.store import Store, validate_run_id
from gleaner.tasks.ingest.formats import MAPPERS, Rejected, detect_format, json_type
from gleaner.tasks.ingest.readers import (
    Item,
    SourceError,
    SourceFile,
    expand_sources,
    read_source,
    sniff_kind,
)

INGEST_STAGE = layout.INGEST
QUARANTINE_STAGE = layout.QUARANTINE
DUPLICATES_STAGE = layout.DUPLICATES
STAGES = (INGEST_STAGE, QUARANTINE_STAGE, DUPLICATES_STAGE)
# Where each dropped duplicate was, and the id of the example kept in its place (for audits).
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
    ]
)
RAW_EXCERPT_CHARS = 1000
DETECT_WINDOW = 100  # records looked at to auto-detect a file's format
SAMPLES = 10  # quarantine rows quoted in the summary, for a person to read

log = logging.getLogger("gleaner.ingest")


class IngestError(Exception):
    """The run cannot proceed (a source cannot be opened, the run id holds other data)."""


# ---- one record ---------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _show_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def excerpt(text: str, limit: int = RAW_EXCERPT_CHARS) -> str:
    """The start of a raw record, always valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return _SURROGATE.sub(_show_surrogate, text[:limit])


def _check_text(label: str, text: str, max_bytes: int) -> None:
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise Rejected(
                "invalid_utf8",
                label,
                f"field '{label}' holds invalid UTF-8 bytes (at character {error.start})",
            ) from None
    if size > max_bytes:
        raise Rejected(
            "too_large",
            label,
            f"field '{label}' is {size:,} bytes, over the {max_bytes:,}-byte limit "
            "(ingest.max_field_bytes)",
        )


def to_row(fmt: str, value: Any, source: str, row: int, settings: IngestConfig) -> dict[str, Any]:
    """One parsed record -> one EXAMPLE_SCHEMA row, or :class:`Rejected` saying why not."""
    if not isinstance(value, dict):
        raise Rejected("not_an_object", None, f"record is a JSON {json_type(value)}, not an object")
    mapped = MAPPERS[fmt](value)
    for label, text in mapped.texts:
        _check_text(label, text, settings.max_field_bytes)
    if settings.require_output and not mapped.output.strip():
        label = mapped.output_field
        raise Rejected(
            "empty_output",
            label,
            f"no response: '{label}' is empty or missing (ingest.require_output)",
        )
    example = Example(
        source=source,
        source_row=row,
        instruction=mapped.instruction,
        input=mapped.input,
        output=mapped.output,
        history=mapped.history,
        metadata=mapped.metadata,
        system=mapped.system,
    )
    out = example.to_row()
    metadata = out["metadata"]
    if not metadata.isascii():
        try:
            metadata.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad_metadata(mapped.metadata) from None
    return out


def _bad_metadata(metadata: dict[str, Any]) -> Rejected:
    for key, value in metadata.items():
        try:
            json.dumps({key: value}, ensure_ascii=False, default=str).encode("utf-8")
        except UnicodeEncodeError:
            return Rejected("invalid_utf8", key, f"field '{key}' holds invalid UTF-8 bytes")
    return Rejected("invalid_utf8", None, "a field holds invalid UTF-8 bytes")


# ---- batched output -----------------------------------------------------------


class PartWriter:
    """Rows in, Parquet parts out (``part-<nnnnn>``), built per batch from column lists."""

    def __init__(self, store: Store, run_id: str, stage: str, schema: pa.Schema, batch_rows: int):
        self.store, self.run_id, self.stage, self.schema = store, run_id, stage, schema
        self.batch_rows = max(1, batch_rows)
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._pairs = list(self.columns.items())
        self.rows = 0
        self.parts = 0
        self.total = 0

    def append(self, row: dict[str, Any]) -> None:
        for name, column in self._pairs:
            column.append(row[name])
        self.rows += 1
        if self.rows >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pydict(self.columns, schema=self.schema)
        self.store.write_part(self.run_id, self.stage, self.parts, table)
        self.parts += 1
        self.total += self.rows
        for column in self.columns.values():
            column.clear()
        self.rows = 0


# ---- one source ---------------------------------------------------------------


@dataclass
class SourceStats:
    url: str
    kind: str
    format: str | None
    read: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    sha256: str | None = None  # of the file's bytes as read (a published version's provenance)
    bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.url,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "kind": self.kind,
            "format": self.format,
            "read": self.read,
            "kept": self.kept,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "reasons": dict(sorted(self.reasons.items())),
        }


def detect_source_format(source: SourceFile, settings: IngestConfig) -> tuple[str, str | None]:
    """(file kind, record format) before anything is written: a file whose records match no
    known format stops the run here, naming it, instead of quarantining every row."""
    kind = sniff_kind(source)
    if settings.format != "auto":
        return kind, settings.format
    first_keys: list[str] | None = None
    items = read_source(source, settings.max_record_bytes, batch_rows=DETECT_WINDOW)
    try:
        parsed = 0
        for _, value, problem, _ in items:
            if problem is not None:
                continue
            fmt = detect_format(value)
            if fmt:
                return kind, fmt
            if first_keys is None:
                first_keys = sorted(value) if isinstance(value, dict) else [json_type(value)]
            parsed += 1
            if parsed >= DETECT_WINDOW:
                break
    finally:
        items.close()
    if first_keys is None:
        return kind, None  # nothing parses: every record is quarantined anyway
    raise IngestError(
        f"cannot tell the format of {source.url}: its first record has keys {first_keys}, "
        f"matching none of {sorted(MAPPERS)}; pass --format"
    )


class Ingestor:
    """Streams sources into the kept/quarantine/duplicates writers; owns the seen-id set."""

    def __init__(self, store: Store, run_id: str, settings: IngestConfig):
        self.settings = settings
        self.kept = PartWriter(store, run_id, INGEST_STAGE, EXAMPLE_SCHEMA, settings.batch_rows)
        self.quarantine = PartWriter(
            store, run_id, QUARANTINE_STAGE, QUARANTINE_SCHEMA, settings.batch_rows
        )
        self.duplicates = PartWriter(
            store, run_id, DUPLICATES_STAGE, DUPLICATE_SCHEMA, settings.batch_rows
        )
        self.seen: set[str] = set()
        self.samples: list[dict[str, Any]] = []
        # ingest.limit: records still to read over all sources (None: no limit)
        self.remaining: int | None = settings.limit

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def _quarantine(
        self,
        stats: SourceStats,
        row: int,
        code: str,
        field_name: str | None,
        reason: str,
        raw: str | None,
        value: Any = None,
    ) -> None:
        if raw is None and value is not None:
            raw = json.dumps(value, ensure_ascii=False, default=str)[:RAW_EXCERPT_CHARS]
        record = {
            "source": stats.url,
            "source_row": row,
            "field": field_name,
            "reason": reason,
            "raw": None if raw is None else excerpt(raw),
        }
        self.quarantine.append(record)
        stats.quarantined += 1
        stats.reasons[code] += 1
        if len(self.samples) < SAMPLES:
            self.samples.append({k: record[k] for k in ("source", "source_row", "field", "reason")})

    def ingest(self, source: SourceFile, kind: str, fmt: str | None) -> SourceStats:
        stats = SourceStats(url=source.url, kind=kind, format=fmt)
        settings, seen, append = self.settings, self.seen, self.kept.append
        items: Iterator[Item] = read_source(source, settings.max_record_bytes, settings.batch_rows)
        for row, value, problem, raw in items:
            if self.exhausted:
                break
            if self.remaining is not None:
                self.remaining -= 1
            stats.read += 1
            if problem is not None:
                self._quarantine(stats, row, problem.code, problem.field, problem.reason, raw)
                continue
            if fmt is None:
                fmt = stats.format = detect_format(value)
                if fmt is None:
                    self._quarantine(
                        stats,
                        row,
                        "unknown_format",
                        None,
                        "record matches no known format; pass --format",
                        raw,
                        value,
                    )
                    continue
            try:
                out = to_row(fmt, value, source.url, row, settings)
            except Rejected as rejected:
                self._quarantine(
                    stats, row, rejected.code, rejected.field, rejected.reason, raw, value
                )
                continue
            example_id = out["id"]
            if example_id in seen:
                stats.duplicates += 1
                self.duplicates.append({"source": source.url, "source_row": row, "id": example_id})
                continue
            seen.add(example_id)
            append(out)
            stats.kept += 1
        log.info(
            "ingested %s: read %d, kept %d, quarantined %d, duplicates %d",
            source.url,
            stats.read,
            stats.kept,
            stats.quarantined,
            stats.duplicates,
        )
        return stats


# ---- the stage ----------------------------------------------------------------


def file_digest(source: SourceFile) -> tuple[str, int]:
    """sha256 and size of a source file's stored bytes (compressed as stored)."""
    digest, size = hashlib.sha256(), 0
    with source.fs.open(source.path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def summary_path(store: Store, run_id: str) -> str:
    return layout.summary_path(store, run_id, INGEST_STAGE)


class IngestStep(Step):
    """The whole ingest as one step: its key is the source files and the ingest settings."""

    kind = INGEST_STAGE
    description = "where every record read went"
    force_hint = "--force (gleaner ingest; curate: another --run-id)"

    def __init__(self, plan: list[tuple[SourceFile, str, str | None]], config: GleanerConfig):
        self.plan, self.config = plan, config
        self.urls = [source.url for source, _, _ in plan]
        self.settings_record = config.ingest.model_dump(mode="json", exclude={"source_options"})

    def settings(self) -> dict[str, Any]:
        return {"source_files": self.urls, "settings": self.settings_record}

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(summary_path(store, run_id))

    def clear(self, store: Store, run_id: str) -> None:
        for stage in STAGES:
            store.clear_stage(run_id, stage)

    def adopt(self, store: Store, run_id: str) -> dict[str, Any] | None:
        """An ingest made before steps kept records, of the same sources and settings."""
        if not self.done(store, run_id):
            return None
        previous = store.read_json(summary_path(store, run_id))
        if (previous.get("source_files"), previous.get("settings")) != (
                self.urls, self.settings_record):
            raise PlanMismatch(
                f"run {run_id!r} already holds an ingest of other sources or settings; "
                f"rerun with the same ones, or {self.force_hint} to replace it")
        return previous

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        self.clear(store, run_id)  # it streams: an interrupted attempt is redone from scratch
        started = time.perf_counter()
        ingestor = Ingestor(store, run_id, self.config.ingest)
        per_source: list[SourceStats] = []
        for source, kind, fmt in self.plan:
            if ingestor.exhausted:
                break
            try:
                per_source.append(ingestor.ingest(source, kind, fmt))
                per_source[-1].sha256, per_source[-1].bytes = file_digest(source)
            except SourceError as error:
                raise IngestError(str(error)) from error
            except OSError as error:
                raise IngestError(f"cannot read {source.url}: {error}") from error
        ingestor.kept.flush()
        ingestor.quarantine.flush()
        ingestor.duplicates.flush()
        seconds = time.perf_counter() - started
        summary = _summary(run_id, store, per_source, ingestor, self.settings_record,
                           self.urls, seconds)
        if summary["read"] != summary["kept"] + summary["quarantined"] + summary["duplicates"]:
            raise AssertionError(f"ingest counts do not add up: {summary}")  # a bug, never data
        store.write_json(summary_path(store, run_id), summary)
        record_run(store, run_id, self.config, ingest=summary)
        return summary

    def markdown(self, summary: dict[str, Any]) -> str:
        return summary_markdown(summary)


def run_ingest(
    sources: Sequence[str],
    store: Store,
    run_id: str,
    config: GleanerConfig,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest ``sources`` into ``runs/<run_id>/ingest`` (+ ``quarantine``) and return the summary.

    On the step contract (gleaner.engine.step): a rerun with the same sources and settings
    returns the finished summary (``reused``), other sources or settings are refused unless
    ``force``, and an interrupted attempt (no summary) is redone."""
    validate_run_id(run_id)
    if not sources:
        raise IngestError("no source given")
    options = source_options(sources, config)
    try:
        files = expand_sources(sources, options)
        plan = [(source, *detect_source_format(source, config.ingest)) for source in files]
    except SourceError as error:
        raise IngestError(str(error)) from error
    return run_step(store, run_id, IngestStep(plan, config), force=force)


def source_options(sources: Sequence[str], config: GleanerConfig) -> dict[str, Any]:
    """fsspec options for reading sources: ``ingest.source_options``, else the store's when the
    sources live on the store's own protocol (one S3 endpoint for both)."""
    if config.ingest.source_options:
        return dict(config.ingest.source_options)
    store_protocol = config.store.url.split("://", 1)[0] if "://" in config.store.url else "file"
    remote = [s.split("://", 1)[0] for s in sources if "://" in s]
    if remote and all(protocol == store_protocol for protocol in remote):
        return dict(config.store.options)
    return {}


def _summary(
    run_id: str,
    store: Store,
    per_source: list[SourceStats],
    ingestor: Ingestor,
    settings_record: dict[str, Any],
    urls: list[str],
    seconds: float,
) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for stats in per_source:
        reasons.update(stats.reasons)
    read = sum(s.read for s in per_source)
    return {
        "run_id": run_id,
        "stage": INGEST_STAGE,
        "read": read,
        "kept": sum(s.kept for s in per_source),
        "quarantined": sum(s.quarantined for s in per_source),
        "duplicates": sum(s.duplicates for s in per_source),
        "reasons": dict(sorted(reasons.items())),
        "sources": [s.as_dict() for s in per_source],
        "source_files": urls,
        "parts": ingestor.kept.parts,
        "quarantine_parts": ingestor.quarantine.parts,
        "duplicates_output": store.uri(store.stage_path(run_id, DUPLICATES_STAGE)),
        "output": store.uri(store.stage_path(run_id, INGEST_STAGE)),
        "quarantine_output": store.uri(store.stage_path(run_id, QUARANTINE_STAGE)),
        "quarantine_samples": ingestor.samples,
        "settings": settings_record,
        "seconds": round(seconds, 3),
        "rows_per_s": round(read / seconds, 1) if seconds > 0 else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of an ingest."""
    lines = [
        f"ingest {summary['run_id']}: read {summary['read']:,} = kept {summary['kept']:,}"
        f" + quarantined {summary['quarantined']:,} + duplicates {summary['duplicates']:,}"
        + ("  (already done; reused)" if summary.get("reused") else ""),
    ]
    for s in summary["sources"]:
        lines.append(
            f"  {s['source']} [{s['kind']}, {s['format'] or 'unknown'}]: read {s['read']:,}, "
            f"kept {s['kept']:,}, quarantined {s['quarantined']:,}, duplicates {s['duplicates']:,}"
        )
    if summary["reasons"]:
        reasons = ", ".join(f"{code} {n:,}" for code, n in summary["reasons"].items())
        lines.append(f"quarantine reasons: {reasons}")
        for sample in summary.get("quarantine_samples", [])[:5]:
            where = f"{sample['source']}:{sample['source_row']}"
            field_name = f" [{sample['field']}]" if sample["field"] else ""
            lines.append(f"  {where}{field_name}: {sample['reason']}")
        lines.append(f"quarantine: {summary['quarantine_output']}")
    lines.append(f"examples: {summary['output']} ({summary['parts']} parts)")
    return "\n".join(lines)


# ---- as a Prefect task -----------------------------------------------------------------------
@task(name="ingest-sources", retries=0)
def ingest_task(sources: list[str], run_id: str, config: GleanerConfig,
                force: bool = False) -> dict[str, Any]:
    """The whole ingest is one unit: it streams, so it is cheap to redo, and an interrupted
    attempt is redone from scratch."""
    store = Store(config.store.url, config.store.options)
    return run_ingest(sources, store, run_id, config, force=force)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Ingest {summary['run_id']}",
        "",
        f"read **{summary['read']:,}** = kept **{summary['kept']:,}** + quarantined "
        f"**{summary['quarantined']:,}** + duplicates **{summary['duplicates']:,}**",
        "",
        "| source | format | read | kept | quarantined | duplicates |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary["sources"]:
        lines.append(
            f"| {s['source']} | {s['format'] or '?'} | {s['read']:,} | {s['kept']:,} | "
            f"{s['quarantined']:,} | {s['duplicates']:,} |"
        )
    if summary["reasons"]:
        lines += ["", "| quarantine reason | rows |", "|---|---:|"]
        lines += [f"| {code} | {n:,} |" for code, n in summary["reasons"].items()]
        lines += ["", f"Quarantine rows: `{summary['quarantine_output']}`"]
    lines += ["", f"Examples: `{summary['output']}` ({summary['parts']} parts)"]
    return "\n".join(lines)
