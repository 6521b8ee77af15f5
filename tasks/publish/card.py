"""A published version's dataset card (``README.md``) and ``provenance.json``.

Every version (curate's, an experiment's selections, preference data) is published by
``tasks/publish/versions.publish_dataset_version``, which writes both files through
:func:`write_card` before the manifest: a version that exists has them.

``provenance.json`` is read from the run that published it, generically (whatever stages
and steps it recorded, whatever their settings are called):

- ``sources``: each source file's URI, sha256 (computed at ingest), bytes and counts;
- ``stages``: every engine stage's requested / resolved settings and settings key
  (``_plan.json``), ``steps``: every step's settings and key (``steps/<name>.json``);
- ``counts``: the version's rows, ingest's counts and every step's counts per reason;
- ``exclusions``: who excluded which example, when and why (``gleaner view``);
- ``cost``: the run's cost plan next to what its stages spent;
- ``approval``: ``runs/<id>/approval.json`` (None when the run had no approval gate);
- ``software``: gleaner's version, the lock digest, the run's package versions;
- ``rebuild``: the command and the config that rebuild the selection (curate runs record
  them in run.json when they start).

Nothing secret goes in: endpoints keep ``base_url``, ``model`` and the *name* of their key's
environment variable, never a key; storage options are left out; a URL's user:password is
cut; any value of a credential environment variable that still shows up is replaced.

The card's YAML header is huggingface_hub's ``DatasetCardData``: license (config
``publish.license``), size category, task categories and ``configs`` whose data file is the
version's ``data.parquet``, so ``datasets.load_dataset(<version folder>)`` reads the rows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gleaner import layout
from gleaner.engine.step import step_records
from gleaner.store import Store

README_FILE = "README.md"
PROVENANCE_FILE = "provenance.json"
DEFAULT_LICENSE = "unknown"  # what the card says when publish.license is not set
# Hugging Face's size buckets (the hub's filter values), upper bounds exclusive.
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"),
                (1_000_000_000_000, "100B<n<1T"))

# Keys whose values are never written: storage options (they may carry credentials) and
# anything named like a credential. ``api_key_env`` (a variable's name) is kept.
DROPPED_KEYS = {"options", "source_options", "storage_options", "headers", "default_headers",
                "extra_headers", "client_kwargs"}
SECRET_KEY = re.compile(
    r"^(.*_)?(api_?key|secret|secret_key|secret_access_key|password|passwd|token|"
    r"access_token|auth_token|session_token|access_key|access_key_id|credentials?|"
    r"authorization)$", re.IGNORECASE)
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"']+@")
# Environment variables whose values must never appear (besides every api_key_env named).
SECRET_ENV = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "ANTHROPIC_API_KEY")
REDACTED = "<redacted>"


def size_category(rows: int) -> str:
    for bound, label in SIZE_BUCKETS:
        if rows < bound:
            return label
    return "n>1T"


def scrub(value: Any) -> Any:
    """``value`` without credentials: dropped keys, credential-named keys, URL userinfo."""
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items()
                if str(k).lower() not in DROPPED_KEYS and not SECRET_KEY.match(str(k))}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return URL_USERINFO.sub(r"\g<scheme>", value)
    return value


def _key_env_names(value: Any) -> set[str]:
    if isinstance(value, Mapping):
        names = {v for k, v in value.items() if k == "api_key_env" and isinstance(v, str)}
        for v in value.values():
            names |= _key_env_names(v)
        return names
    if isinstance(value, list):
        return set().union(*(_key_env_names(v) for v in value)) if value else set()
    return set()


def redact_text(text: str, document: Any = None) -> str:
    """``text`` with the value of every credential environment variable replaced."""
    for name in {*SECRET_ENV, *_key_env_names(document)}:
        secret = os.environ.get(name) or ""
        if len(secret) >= 6:  # short values (a test's "x") would redact ordinary words
            text = text.replace(secret, REDACTED)
    return text


# ---- what the run knows ----------------------------------------------------------------------


def gleaner_version() -> str | None:
    try:
        return importlib.metadata.version("gleaner")
    except importlib.metadata.PackageNotFoundError:
        return None


def lock_digest() -> dict[str, str]:
    """sha256 of infra/lock/constraints.txt when the checkout has it; else of the installed
    distributions' ``name==version`` lines (sorted), saying which."""
    lock = Path(__file__).resolve().parents[2] / "infra" / "lock" / "constraints.txt"
    if lock.is_file():
        return {"sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
                "of": "infra/lock/constraints.txt"}
    lines = sorted({f"{d.metadata['Name'].lower()}=={d.version}"
                    for d in importlib.metadata.distributions() if d.metadata["Name"]})
    return {"sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "of": "installed distributions (name==version, sorted)"}


def _read(store: Store, path: str) -> Any:
    return store.read_json(path) if store.exists(path) else None


def stage_plans(store: Store, run_id: str) -> dict[str, Any]:
    """Every engine stage's plan: requested and resolved settings and the settings key."""
    base = store.run_path(run_id)
    out: dict[str, Any] = {}
    for path in sorted(store.fs.glob(posixpath.join(base, "**", layout.PLAN_FILE))):
        stage = posixpath.relpath(posixpath.dirname(path), base)
        plan = store.read_json(path)
        out[stage] = {"key": plan.get("key"), "requested": plan.get("requested"),
                      "resolved": plan.get("resolved")}
    return out


def source_files(ingest: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return [{"uri": s.get("source"), "sha256": s.get("sha256"), "bytes": s.get("bytes"),
             "format": s.get("format"), "read": s.get("read"), "kept": s.get("kept"),
             "quarantined": s.get("quarantined"), "duplicates": s.get("duplicates")}
            for s in (ingest or {}).get("sources") or []]


def run_cost(store: Store, run_id: str) -> dict[str, Any] | None:
    plan = _read(store, layout.cost_plan_path(store, run_id))
    if not plan:
        return None
    from gleaner.tasks.cost.report import actual_cost

    return actual_cost(store, run_id, plan)


def run_provenance(store: Store, run_id: str) -> dict[str, Any]:
    """What run ``run_id`` recorded about how it was made (see the module), secrets-free."""
    from gleaner.runs import read_approval
    from gleaner.tasks.select.review import exclusion_records

    run = _read(store, store.run_path(run_id, "run.json")) or {}
    steps = step_records(store, run_id)
    ingest = (steps.get("ingest") or {}).get("summary") or run.get("ingest")
    counts: dict[str, Any] = {}
    if ingest:
        counts["ingest"] = {k: ingest.get(k) for k in ("read", "kept", "quarantined",
                                                      "duplicates", "reasons")}
    base = store.run_path(run_id)
    for path in sorted(store.fs.glob(posixpath.join(base, "**", layout.SUMMARY_FILE))):
        reasons = (store.read_json(path) or {}).get("reasons")
        stage = posixpath.relpath(posixpath.dirname(path), base)
        if stage != "ingest" and isinstance(reasons, Mapping):
            counts[stage] = dict(reasons)  # selection's: kept, excluded, too_similar ...
    for name, record in steps.items():
        reasons = (record.get("summary") or {}).get("reasons")
        if name not in counts and name != "ingest" and isinstance(reasons, Mapping):
            counts[name] = dict(reasons)
    config = run.get("config") or {}
    return scrub({
        "run_id": run_id,
        "sources": source_files(ingest),
        "stages": stage_plans(store, run_id),
        "steps": {name: {"key": r.get("key"), "settings": r.get("settings")}
                  for name, r in steps.items()},
        "counts": counts,
        "exclusions": exclusion_records(store, run_id),
        "cost": run_cost(store, run_id),
        "approval": read_approval(store, run_id),
        "software": {"gleaner": gleaner_version(), "lock": lock_digest(),
                     "packages": run.get("versions")},
        "license": ((config.get("publish") or {}).get("license")) or DEFAULT_LICENSE,
        "rebuild": rebuild_entry(run, ingest),
    })


def rebuild_entry(run: Mapping[str, Any], ingest: Mapping[str, Any] | None
                  ) -> dict[str, Any] | None:
    """The command and config that rebuild a curate run's selection, from what the run
    recorded when it started (run.json: ``flow``, ``sources``, ``config``) and the files
    its ingest read; None for a run that is no curate run (made verb by verb)."""
    if run.get("command"):
        return dict(run["command"])
    if run.get("flow") != "curate" or not run.get("config"):
        return None
    sources = list((ingest or {}).get("source_files") or run.get("sources") or [])
    return rebuild_command(sources, run["config"])


def rebuild_command(sources: list[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """The argv that reruns a curate run (``{config}``: a file holding ``config``;
    ``{run_id}``: a new run id), and its resolved config, secrets-free."""
    document = scrub({k: v for k, v in config.items() if k != "run_id"})
    return {"command": ["gleaner", "curate", *sources, "--config", "{config}",
                        "--run-id", "{run_id}"],
            "config": document,
            "how": "write `config` to a YAML file, put its path for {config} and a new run "
                   "id for {run_id}, and run `command` (store.options are never recorded: "
                   "add your own for an S3-compatible endpoint)"}


# ---- the two files ---------------------------------------------------------------------------


def card_data(manifest: Mapping[str, Any], provenance: Mapping[str, Any]) -> Any:
    from huggingface_hub import DatasetCardData

    preference = provenance.get("kind") == "preferences"
    return DatasetCardData(
        license=provenance.get("license") or DEFAULT_LICENSE,
        pretty_name=f"{manifest['name']} {manifest['label']}",
        size_categories=[size_category(manifest["counts"]["examples"])],
        task_categories=["text-generation"],
        language=provenance.get("language") or None,
        tags=["gleaner", "instruction-tuning", *(["preference", "dpo"] if preference else [])],
        configs=[{"config_name": "default",
                  "data_files": [{"split": "train", "path": posixpath.basename(
                      manifest["path"])}]}],
    )


def _cell(text: Any) -> str:
    """A person's text as one markdown table cell."""
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---:|", *[f"| {what} | {value} |" for what, value in rows]]


def card_text(manifest: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """README.md: the YAML header, then what a reader wants first."""
    from huggingface_hub import DatasetCard

    lines = [f"# {manifest['name']} {manifest['label']}", "",
             f"{manifest['counts']['examples']:,} examples published by gleaner from run "
             f"`{manifest['run_id']}` on {manifest['created_at'][:10]}. Every number below "
             "comes from `provenance.json` next to this card.", "",
             f"License: `{provenance.get('license') or DEFAULT_LICENSE}` (config "
             "`publish.license`; check the sources' own terms).", "", "## Sources", ""]
    for source in provenance.get("sources") or []:
        lines.append(f"- `{source['uri']}`: {source.get('read')} read, {source.get('kept')} "
                     f"kept (sha256 `{source.get('sha256')}`)")
    if not provenance.get("sources"):
        lines.append("- (the run recorded no ingest)")
    counts = provenance.get("counts") or {}
    if counts:
        lines += ["", "## Where every example went", ""]
        for step, reasons in counts.items():
            if step == "ingest":
                rows = [(k, v) for k, v in reasons.items() if k != "reasons"]
            else:
                rows = sorted(reasons.items())
            lines += [f"**{step}**", "", *_table(rows), ""]
    exclusions = provenance.get("exclusions") or []
    if exclusions:
        lines += ["## Excluded by a person", "", "| id | who | why | when |", "|---|---|---|---|"]
        lines += [f"| `{e['id']}` | {_cell(e['who'])} | {_cell(e['why']) or '—'} | {e['at']} |"
                  for e in exclusions]
        lines.append("")
    approval = provenance.get("approval")
    lines += ["## Approval", "",
              f"{approval.get('state')} by {approval.get('by') or '—'} at "
              f"{approval.get('decided_at') or approval.get('requested_at')}"
              + (f": {approval['note']}" if approval.get("note") else "")
              if approval else "No approval gate for this run.", ""]
    settings = provenance.get("stages") or {}
    steps = provenance.get("steps") or {}
    if settings or steps:
        lines += ["## Settings keys", "", "| stage / step | key |", "|---|---|"]
        lines += [f"| {n} | `{s.get('key')}` |" for n, s in {**settings, **steps}.items()]
        lines.append("")
    cost = provenance.get("cost")
    if cost:
        lines += [f"Cost: ${cost.get('usd') or 0:,.4f} spent, "
                  f"${cost.get('planned_usd') or 0:,.4f} planned.", ""]
    software = provenance.get("software") or {}
    lock = software.get("lock") or {}
    lines += ["## Software", "", f"gleaner {software.get('gleaner')}; lock sha256 "
              f"`{lock.get('sha256')}` ({lock.get('of')}).", ""]
    rebuild = provenance.get("rebuild")
    lines += ["## Rebuild", ""]
    if rebuild:
        lines += ["Write `rebuild.config` of `provenance.json` to `config.yaml`, then:", "",
                  "```", " ".join(rebuild["command"]).replace("{config}", "config.yaml")
                  .replace("{run_id}", "<new-run-id>"), "```"]
    else:
        lines.append("This run did not record a command (made verb by verb): see `steps`.")
    content = f"---\n{card_data(manifest, provenance).to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(DatasetCard(content))


def write_card(store: Store, directory: str, manifest: Mapping[str, Any],
               provenance: Mapping[str, Any]) -> dict[str, str]:
    """README.md and provenance.json into the version folder ``directory``; their paths."""
    document = {"dataset": {k: manifest[k] for k in (
        "name", "version", "label", "run_id", "created_at", "counts", "ids_sha256")},
        "data_file": {"path": posixpath.basename(manifest["path"]),
                      "sha256": manifest.get("data_sha256")},
        **scrub(dict(provenance))}
    text = redact_text(json.dumps(document, indent=2, sort_keys=True, default=str), document)
    card = redact_text(card_text(manifest, json.loads(text)), document)
    paths = {"provenance": posixpath.join(directory, PROVENANCE_FILE),
             "card": posixpath.join(directory, README_FILE)}
    store.write_bytes(paths["provenance"], (text + "\n").encode("utf-8"))
    store.write_bytes(paths["card"], card.encode("utf-8"))
    return paths


def read_provenance(store: Store, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    path = posixpath.join(posixpath.dirname(manifest["path"]), PROVENANCE_FILE)
    return _read(store, path)
