"""The checkpoint store: Parquet parts and JSON documents on any fsspec URL.

Layout: ``<root>/runs/<run_id>/<stage>/part-<nnnnn>.parquet``. A part is
written atomically (temp file + rename on a local disk, one PUT on an object
store), so listing the finished parts of a stage is how a rerun knows what is
done. Cross-run caches live under ``<root>/cache/<name>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or written: one line naming its URL and the cause."""

    def __init__(self, url: str, cause: str):
        super().__init__(f"cannot use store {url}: {cause}")
        self.url, self.cause = url, cause


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 10:
        seen.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return seen


def store_failure(error: BaseException) -> str | None:
    """The cause in a few words when ``error`` (or what it wraps) says a store cannot be
    reached or written: no credentials, a missing bucket, access denied, no connection, a
    folder without write permission. None for anything else."""
    for item in _chain(error):
        name = type(item).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return ("no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, or give the machine a role)")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError"):
            return f"cannot connect: {item}"
        code = (getattr(item, "response", None) or {}).get("Error", {}).get("Code")
        if code == "NoSuchBucket":
            return "the bucket does not exist"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken", "403"):
            return f"access denied ({code})"
        if isinstance(item, StoreUnavailable):
            return item.cause
        if isinstance(item, PermissionError):
            where = f": {item.filename}" if item.filename else ""
            return f"permission denied{where}"
    return None


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ValueError(
            f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return run_id


class Store:
    """One store URL, resolved once into an fsspec filesystem and a root path."""

    def __init__(self, url: str = "./gleaner-data", storage_options: dict[str, Any] | None = None):
        options = dict(storage_options or {})
        endpoint = options.pop("endpoint_url", None)
        if endpoint and url.startswith("s3://"):
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except PermissionError as error:
                raise StoreUnavailable(url, store_failure(error) or str(error)) from None

    def check_access(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be used: a folder this user
        cannot write, an object store without credentials or bucket. Cheap: one request."""
        try:
            if self.is_local:
                if not os.access(self.root, os.W_OK | os.X_OK):
                    raise PermissionError(13, "not writable", self.root)
            elif self.url.startswith(("s3://", "s3a://")):
                from fsspec.asyn import sync

                bucket = self.root.split("/", 1)[0]
                try:
                    sync(self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=bucket)
                except FileNotFoundError:
                    raise StoreUnavailable(self.url, f"the bucket {bucket!r} does not exist"
                                           ) from None
            else:
                with contextlib.suppress(FileNotFoundError):  # nothing written yet
                    self.fs.ls(self.root, detail=False)
        except StoreUnavailable:
            raise
        except Exception as error:
            cause = store_failure(error)
            if cause is None:
                raise StoreUnavailable(self.url, f"{type(error).__name__}: {error}") from None
            raise StoreUnavailable(self.url, cause) from None

    @classmethod
    def check(cls, url: str, storage_options: dict[str, Any] | None = None) -> None:
        """:meth:`check_access` without making anything: a local store is checked on its
        nearest existing folder (a command refused later must not leave an empty store)."""
        if "://" in url and not url.startswith("file://"):
            cls(url, storage_options).check_access()
            return
        folder = Path(url.removeprefix("file://")).expanduser().absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise StoreUnavailable(url, f"permission denied: {folder}")

    def __repr__(self) -> str:  # never show storage options: they may carry credentials
        return f"Store({self.url!r})"

    # ---- paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run_path(self, run_id: str, *parts: str) -> str:
        return self.path("runs", validate_run_id(run_id), *parts)

    def stage_path(self, run_id: str, stage: str) -> str:
        return self.run_path(run_id, stage)

    def uri(self, path: str) -> str:
        """A full URL for a store path, for messages and for other tools."""
        return self.fs.unstrip_protocol(path)

    # ---- atomic writes -----------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> str:
        """Write a whole object atomically: readers see all of it or none of it."""
        parent = posixpath.dirname(path)
        if self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # Object stores make a single PUT atomic: the key appears complete or not at all.
            self.fs.pipe_file(path, data)
        return path

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if nothing is there; False when it already exists.

        Local disks: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``).
        Other filesystems: exists-then-write, which two racing writers can both pass.
        """
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        if getattr(self.fs, "protocol", None) in ("s3", ("s3", "s3a")) or self.url.startswith(
                "s3://"):
            from fsspec.asyn import sync

            bucket, key, _ = self.fs.split_path(path)
            try:
                sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key,
                     Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            self.fs.invalidate_cache(path)
            return True
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def delete(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_table(self, path: str, table: pa.Table, row_group_size: int = 8192) -> str:
        """One Parquet object; row groups of ``row_group_size`` rows let a worker read a slice."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_size)
        return self.write_bytes(path, buffer.getvalue())

    def write_part(self, run_id: str, stage: str, index: int, table: pa.Table) -> str:
        return self.write_table(
            posixpath.join(self.stage_path(run_id, stage), part_name(index)), table
        )

    def write_json(self, path: str, document: Any) -> str:
        text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        return self.write_bytes(path, text.encode("utf-8"))

    # ---- reads -------------------------------------------------------------
    def copy_to_scratch(self, path: str, prefix: str) -> tempfile.TemporaryDirectory[str]:
        """A store folder (a model) copied into a temporary local folder, for a worker on a
        node that reads an object store; the caller cleans it up."""
        scratch = tempfile.TemporaryDirectory(prefix=prefix)
        self.fs.get(path.rstrip("/") + "/", scratch.name, recursive=True)
        return scratch

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def part_paths(self, directory: str) -> dict[int, str]:
        """Finished parts under a directory, by index (temp files and others are ignored)."""
        try:
            entries = self.fs.ls(directory, detail=False, refresh=True)
        except FileNotFoundError:
            return {}
        parts: dict[int, str] = {}
        for entry in entries:
            match = PART_RE.match(posixpath.basename(entry))
            if match:
                parts[int(match.group(1))] = entry
        return dict(sorted(parts.items()))

    def finished_parts(self, run_id: str, stage: str) -> set[int]:
        return set(self.part_paths(self.stage_path(run_id, stage)))

    def dataset(self, paths: Iterable[str], schema: pa.Schema | None = None) -> ds.Dataset:
        return ds.dataset(list(paths), format="parquet", filesystem=self.fs, schema=schema)

    def stage_dataset(self, run_id: str, stage: str, schema: pa.Schema | None = None) -> ds.Dataset:
        """A stage's output as one pyarrow dataset (empty when the stage wrote nothing)."""
        paths = list(self.part_paths(self.stage_path(run_id, stage)).values())
        if not paths and schema is None:
            raise FileNotFoundError(
                f"stage {stage!r} of run {run_id!r} has no output in {self.uri(self.root)}"
            )
        return self.dataset(paths, schema=schema)

    def read_stage(
        self,
        run_id: str,
        stage: str,
        columns: list[str] | None = None,
        schema: pa.Schema | None = None,
    ) -> pa.Table:
        return self.stage_dataset(run_id, stage, schema=schema).to_table(columns=columns)

    def stage_version(self, run_id: str, stage: str) -> str | None:
        """Changes when a stage's parts change (names, sizes, write times); None: no parts.

        What a step that reads the stage keys on, without reading it."""
        try:
            entries = self.fs.ls(self.stage_path(run_id, stage), detail=True, refresh=True)
        except FileNotFoundError:
            return None
        marks = sorted(
            f"{posixpath.basename(e['name'])}:{e.get('size')}:"
            f"{e.get('mtime') or e.get('LastModified') or e.get('ETag') or e.get('created')}"
            for e in entries if PART_RE.match(posixpath.basename(e["name"])))
        if not marks:
            return None
        return hashlib.sha256("|".join(marks).encode()).hexdigest()[:16]

    def has_stage(self, run_id: str, stage: str) -> bool:
        return bool(self.part_paths(self.stage_path(run_id, stage)))

    def list_runs(self) -> list[str]:
        try:
            entries = self.fs.ls(self.path("runs"), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def clear_stage(self, run_id: str, stage: str) -> None:
        """Forget a stage's output (for --force); later stages must be recomputed by the caller."""
        directory = self.stage_path(run_id, stage)
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)
