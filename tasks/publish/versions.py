"""Dataset versions for scheduled refreshes, and what changed between them.

A weekly refresh must answer "what is different from last week's dataset?".
Each publish writes an immutable ``datasets/<name>/v<NNNN>/`` folder holding
``data.parquet``, ``README.md`` (a Hugging Face dataset card), ``provenance.json``
(tasks/publish/card.py) and ``manifest.json``; the manifest is written last, so a
version without one is an interrupted publish and is ignored (and its number
reused). Examples are compared by ``id``, a content hash: an edited example is
therefore one removed id plus one added id.

Publishing is idempotent per run: a Prefect retry of the publish task finds the
version the same run already wrote and returns it instead of adding another.
Two refreshes of one dataset must not publish at the same moment (object
stores have no create-if-absent); the ``curate`` deployment runs with a
concurrency limit of 1 for that reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.store import Store, validate_run_id

VERSION_RE = re.compile(r"^v(\d{4,})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DATA_FILE = "data.parquet"
MANIFEST_FILE = "manifest.json"
# Request counters a stage may report; the diff shows them when the stats hold them.
REQUEST_KEYS = ("requests_sent", "requests_saved")


def validate_dataset_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"dataset name {name!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return name


def version_label(number: int) -> str:
    return f"v{number:04d}"


def dataset_dir(store: Store, name: str) -> str:
    return layout.dataset_dir(store, validate_dataset_name(name))


def list_versions(store: Store, name: str) -> list[dict[str, Any]]:
    """Manifests of the finished versions of a dataset, oldest first."""
    directory = dataset_dir(store, name)
    try:
        entries = store.fs.ls(directory, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    numbered: list[tuple[int, str]] = []
    for entry in entries:
        match = VERSION_RE.match(posixpath.basename(entry.rstrip("/")))
        if match:
            numbered.append((int(match.group(1)), entry.rstrip("/")))
    manifests = []
    for _, path in sorted(numbered):
        manifest_path = posixpath.join(path, MANIFEST_FILE)
        if store.exists(manifest_path):
            manifests.append(store.read_json(manifest_path))
    return manifests


def latest_version(store: Store, name: str) -> dict[str, Any] | None:
    versions = list_versions(store, name)
    return versions[-1] if versions else None


def find_version(store: Store, name: str, version: int | None = None) -> dict[str, Any]:
    """The manifest of ``name``'s version ``version`` (the latest when None)."""
    versions = list_versions(store, name)
    if version is not None:
        versions = [m for m in versions if m["version"] == version]
    if not versions:
        which = "any version" if version is None else version_label(version)
        raise FileNotFoundError(f"dataset {name!r} has no {which} in {store.uri(store.root)}")
    return versions[-1]


def read_version(store: Store, name: str, version: int | None = None) -> pa.Table:
    """A published dataset (the latest when ``version`` is None)."""
    return _read(store, find_version(store, name, version)["path"])


def _read(store: Store, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    with store.fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def _ids(table: pa.Table) -> pa.Array:
    if "id" not in table.column_names:
        raise ValueError("a dataset to publish needs an 'id' column (the example id)")
    ids = pc.unique(table.column("id").combine_chunks())
    if ids.null_count:
        raise ValueError("a dataset to publish has examples without an id")
    return ids


def id_diff(previous: pa.Array, current: pa.Array) -> dict[str, int]:
    """Added / removed / unchanged counts between two sets of example ids."""
    kept = pc.sum(pc.is_in(current, value_set=previous)).as_py() or 0
    return {
        "added": len(current) - kept,
        "removed": len(previous) - kept,
        "unchanged": kept,
    }


def ids_digest(ids: pa.Array) -> str:
    """A fingerprint of the id set: equal digests mean the same examples."""
    digest = hashlib.sha256()
    for value in sorted(ids.to_pylist()):
        digest.update(value.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def publish_dataset_version(
    store: Store,
    name: str,
    run_id: str,
    selected: pa.Table,
    stats: dict[str, Any] | None = None,
    again: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the next version of dataset ``name`` and report what changed since the last one.

    A run publishes once (a retry returns its version) unless ``again`` (a forced publish).
    The version's card and provenance hold what run ``run_id`` recorded
    (card.run_provenance) and what the caller adds in ``provenance`` (its keys win).

    Returns the manifest: ``version``, ``path``, ``run_id``, ``created_at``,
    ``counts`` and ``diff`` (added / removed / unchanged example ids against
    the previous version, plus requests sent / saved when ``stats`` has them).
    """
    validate_run_id(run_id)
    stats = dict(stats or {})
    versions = list_versions(store, name)
    for manifest in versions:
        if manifest["run_id"] == run_id and not again:
            return manifest  # a retry of the same run's publish: already done
    previous = versions[-1] if versions else None
    number = previous["version"] + 1 if previous else 1
    directory = posixpath.join(dataset_dir(store, name), version_label(number))
    data_path = posixpath.join(directory, DATA_FILE)

    ids = _ids(selected)
    if previous is not None:
        previous_ids = _ids(_read(store, previous["path"]).select(["id"]))
        diff: dict[str, Any] = id_diff(previous_ids, ids)
        diff["previous_version"] = previous["version"]
        diff["previous_run_id"] = previous["run_id"]
    else:
        diff = {"added": len(ids), "removed": 0, "unchanged": 0,
                "previous_version": None, "previous_run_id": None}
    for key in REQUEST_KEYS:
        if key in stats:
            diff[key] = stats[key]

    store.write_table(data_path, selected)
    digest = hashlib.sha256()
    with store.fs.open(data_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    manifest = {
        "name": name,
        "version": number,
        "label": version_label(number),
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "path": data_path,
        "uri": store.uri(data_path),
        "counts": {"examples": selected.num_rows, "unique_ids": len(ids)},
        "ids_sha256": ids_digest(ids),
        "data_sha256": digest.hexdigest(),
        "stats": stats,
        "diff": diff,
    }
    from gleaner.tasks.publish.card import run_provenance, write_card

    write_card(store, directory, manifest, {**run_provenance(store, run_id), **(provenance or {})})
    # Written last: its presence is what makes the version exist.
    store.write_json(posixpath.join(directory, MANIFEST_FILE), manifest)
    return manifest


def diff_ingest(
    store: Store, previous_run_id: str, run_id: str, stage: str = "examples"
) -> dict[str, Any]:
    """What changed in the source pool between two runs' ingested examples (by example id)."""
    tables = {}
    for which in (previous_run_id, run_id):
        if not store.has_stage(which, stage):
            raise FileNotFoundError(
                f"run {which!r} has no {stage!r} stage in {store.uri(store.root)}"
            )
        tables[which] = store.read_stage(which, stage, columns=["id"])
    previous_ids = _ids(tables[previous_run_id])
    ids = _ids(tables[run_id])
    return {
        "previous_run_id": previous_run_id,
        "run_id": run_id,
        "previous_total": len(previous_ids),
        "total": len(ids),
        **id_diff(previous_ids, ids),
    }


def diff_markdown(manifest: dict[str, Any], ingest: dict[str, Any] | None = None) -> str:
    """The refresh report a person reads in the Prefect UI (a markdown artifact)."""
    diff = manifest["diff"]
    since = (
        f"since {version_label(diff['previous_version'])} (run `{diff['previous_run_id']}`)"
        if diff.get("previous_version")
        else "(first version)"
    )
    lines = [
        f"### Dataset `{manifest['name']}` {manifest['label']} {since}",
        "",
        "| | examples |",
        "|---|---:|",
        f"| in this version | {manifest['counts']['examples']} |",
        f"| added | {diff['added']} |",
        f"| removed | {diff['removed']} |",
        f"| unchanged | {diff['unchanged']} |",
    ]
    for key in REQUEST_KEYS:
        if key in diff:
            lines.append(f"| {key.replace('_', ' ')} | {diff[key]} |")
    if ingest is not None:
        lines += [
            "",
            f"Source pool since run `{ingest['previous_run_id']}`: "
            f"{ingest['added']} added, {ingest['removed']} removed, "
            f"{ingest['unchanged']} unchanged ({ingest['total']} examples now).",
        ]
    lines += ["", f"Data: `{manifest['uri']}`"]
    return "\n".join(lines)
