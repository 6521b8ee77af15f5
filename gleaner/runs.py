"""Run identity and the run record (``runs/<run_id>/run.json``): config and package versions."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import secrets
from typing import Any

from gleaner.config import GleanerConfig
from gleaner.store import Store, validate_run_id

RECORDED_PACKAGES = (
    "gleaner",
    "prefect",
    "prefect-ray",
    "ray",
    "openai",
    "pandas",
    "pyarrow",
    "fsspec",
    "s3fs",
    "torch",
    "transformers",
    "sentence-transformers",
)


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str]:
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_record_path(store: Store, run_id: str) -> str:
    return store.run_path(run_id, "run.json")


def record_run(store: Store, run_id: str, config: GleanerConfig, **extra: Any) -> dict[str, Any]:
    """Create or update run.json. The config holds no secrets (keys are read from env by name)."""
    validate_run_id(run_id)
    path = run_record_path(store, run_id)
    record: dict[str, Any] = store.read_json(path) if store.exists(path) else {}
    now = dt.datetime.now(dt.UTC).isoformat()
    record.setdefault("run_id", run_id)
    record.setdefault("created_at", now)
    record["updated_at"] = now
    record["config"] = config.model_dump(mode="json")
    record["versions"] = package_versions()
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key].update(value)
        else:
            record[key] = value
    store.write_json(path, record)
    return record


def read_run(store: Store, run_id: str) -> dict[str, Any]:
    path = run_record_path(store, run_id)
    if not store.exists(path):
        raise FileNotFoundError(f"run {run_id!r} not found in {store.uri(store.root)}")
    return store.read_json(path)


# ---- the approval marker ---------------------------------------------------------------------
# A run that waits for a person before it goes on (an approval gate) says so in
# runs/<id>/approval.json: {"state": "waiting" | "approved" | "rejected" | "superseded" |
# "timed out", "what": what waits (e.g. "publish"), "requested_at": ISO time, "decided_at":
# ISO time, "by": who decided, "note": their comment, ...what the gate adds}. The gate writes
# it (request_approval / decide_approval); `gleaner runs` reads it: "waiting" is "awaiting
# approval"; the dataset card of an approved version reads who, when and the note.
APPROVAL_FILE = "approval.json"
APPROVAL_STATES = ("waiting", "approved", "rejected", "superseded", "timed out")


def approval_path(store: Store, run_id: str) -> str:
    return store.run_path(run_id, APPROVAL_FILE)


def read_approval(store: Store, run_id: str) -> dict[str, Any] | None:
    path = approval_path(store, run_id)
    return store.read_json(path) if store.exists(path) else None


def request_approval(store: Store, run_id: str, what: str, **extra: Any) -> dict[str, Any]:
    """Mark ``run_id`` as waiting for a person to approve ``what``."""
    record = {"state": "waiting", "what": what,
              "requested_at": dt.datetime.now(dt.UTC).isoformat(), **extra}
    store.write_json(approval_path(store, run_id), record)
    return record


def decide_approval(store: Store, run_id: str, approved: bool, by: str | None = None,
                    note: str | None = None, state: str | None = None, **extra: Any
                    ) -> dict[str, Any]:
    """Record the decision on a waiting run: who (``by``), when (``decided_at``), the comment
    (``note``); ``approved`` or ``rejected``, or ``state`` when the run ended unpublished for
    another reason (``superseded``, ``timed out``)."""
    if state is not None and state not in APPROVAL_STATES:
        raise ValueError(f"approval state must be one of {', '.join(APPROVAL_STATES)}")
    record = read_approval(store, run_id) or {}
    record.update(state=state or ("approved" if approved else "rejected"), by=by, note=note,
                  decided_at=dt.datetime.now(dt.UTC).isoformat(), **extra)
    store.write_json(approval_path(store, run_id), record)
    return record
