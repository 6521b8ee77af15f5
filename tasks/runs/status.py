"""What each run of a store is doing, read from the store alone (``gleaner runs``).

A run is what its files say:

- ``run.json``: when it started (``created_at``) and was last recorded;
- each engine stage: ``<stage>/_summary.json`` (``status``: completed, or stopped by a
  fatal error; failed rows over the stage's ``max_failed_share`` fail it too) and its lease
  ``_leases/<stage>.json``: a live lease is a stage **running** now; a stale one (no
  heartbeat within its ttl, or a process of this host that is gone) is a stage that
  **crashed** (a failure); parts or a plan without a summary and without a lease are a
  stage that stopped before its summary (a failure);
- each step (gleaner.engine.step): ``steps/<name>.json``, written when the step is done;
- ``approval.json`` (gleaner.runs.request_approval): state ``waiting`` is **awaiting
  approval**;
- the dataset versions of ``datasets/<name>/vNNNN/manifest.json`` that name the run;
- cost: the stages' and steps' ``est_cost_usd``, and ``cost_plan.json``'s planned total.

The run's state, first that applies: ``running`` (a stage is), ``failed`` (a stage
failed or crashed and was not redone), ``awaiting approval``, ``finished`` (something is
done), ``empty``.
"""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import Any

from gleaner import layout
from gleaner.engine.lease import holder_is_stale
from gleaner.engine.step import STEPS_DIR
from gleaner.runs import APPROVAL_FILE
from gleaner.store import Store, validate_run_id
from gleaner.tasks.publish.versions import list_versions

LEASES_DIR = "_leases"


class UnknownRun(LookupError):
    """No such run in the store."""


def _relative(path: str, base: str) -> str:
    return posixpath.relpath(path, base)


def _read(store: Store, path: str) -> dict[str, Any] | None:
    try:
        document = store.read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def published_versions(store: Store) -> dict[str, list[dict[str, Any]]]:
    """run id -> the dataset versions it published (name, version, label, examples)."""
    try:
        names = [posixpath.basename(e.rstrip("/"))
                 for e in store.fs.ls(store.path("datasets"), detail=False, refresh=True)]
    except FileNotFoundError:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(names):
        try:
            manifests = list_versions(store, name)
        except ValueError:  # not a dataset folder
            continue
        for manifest in manifests:
            out.setdefault(manifest.get("run_id", ""), []).append({
                "dataset": name, "version": manifest.get("version"),
                "label": manifest.get("label"), "created_at": manifest.get("created_at"),
                "examples": (manifest.get("counts") or {}).get("examples"),
                "uri": manifest.get("uri")})
    return out


def _stage_state(summary: dict[str, Any] | None, lease: dict[str, Any] | None
                 ) -> tuple[str, str]:
    """(state, why) of one engine stage."""
    if lease is not None and not holder_is_stale(lease):
        age = dt.datetime.now(dt.UTC).timestamp() - float(lease.get("heartbeat", 0))
        return "running", (f"{lease.get('host')} pid {lease.get('pid')}, heartbeat "
                           f"{age:.0f}s ago")
    if lease is not None:
        return "crashed", (f"its runner ({lease.get('host')} pid {lease.get('pid')}) died: "
                           f"last heartbeat {lease.get('heartbeat_at')}")
    if summary is None:
        return "failed", "stopped before its summary"
    if summary.get("status") not in (None, "completed"):
        return "failed", str(summary.get("stopped_because") or summary.get("status"))
    failed, examples = summary.get("failed") or 0, summary.get("examples") or 0
    budget = summary.get("max_failed_share")
    if budget is not None and examples and failed / examples > float(budget):
        return "failed", (f"{failed} of {examples} rows failed, over the failure budget of "
                          f"{float(budget):.1%}")
    return "done", ""


def run_status(store: Store, run_id: str, versions: dict[str, list[dict[str, Any]]] | None
               = None) -> dict[str, Any]:
    """Everything ``gleaner runs show`` says of one run (see the module)."""
    validate_run_id(run_id)
    base = store.run_path(run_id)
    try:
        files = [f for f in store.fs.find(base) if not posixpath.basename(f).startswith(".tmp-")]
    except FileNotFoundError:
        files = []
    if not files:
        raise UnknownRun(f"run {run_id!r} not found in {store.url}; `gleaner runs --store "
                         f"{store.url}` lists its runs")
    record = _read(store, layout.run_record(store, run_id)) or {}
    summaries: dict[str, dict[str, Any] | None] = {}
    leases: dict[str, dict[str, Any] | None] = {}
    touched: set[str] = set()  # stages with a plan
    steps: list[dict[str, Any]] = []
    for path in files:
        relative = _relative(path, base)
        folder, name = posixpath.split(relative)
        if folder == LEASES_DIR and name.endswith(".json"):
            leases[name[:-len(".json")].replace("--", "/")] = _read(store, path)
        elif folder == STEPS_DIR and name.endswith(".json"):
            step = _read(store, path)
            if step is not None:
                steps.append(step)
        elif name == layout.SUMMARY_FILE:
            summaries[folder] = _read(store, path)
        elif folder and name == layout.PLAN_FILE:
            touched.add(folder)
    # a stage: a plan or a lease (an engine stage writes its plan before any part); a summary
    # without either is a step's output (ingest, select, compare's pairs), counted as its step
    names = sorted(set(leases) | touched)
    stages = []
    for name in names:
        summary = summaries.get(name)
        state, why = _stage_state(summary, leases.get(name))
        entry: dict[str, Any] = {"stage": name, "state": state, "why": why}
        if summary:
            entry.update({k: summary.get(k) for k in (
                "examples", "ok", "failed", "requests", "est_cost_usd", "price_known", "seconds")
                if k in summary})
        lease = leases.get(name)
        if lease and lease.get("flow_run"):
            entry["flow_run"] = lease["flow_run"]
        stages.append(entry)
    step_rows = [{"step": s.get("step"), "state": "done",
                  "reused": (s.get("summary") or {}).get("reused"),
                  "est_cost_usd": (s.get("summary") or {}).get("est_cost_usd")} for s in steps]
    counts = {state: sum(1 for s in stages if s["state"] == state)
              for state in ("done", "running", "failed", "crashed")}
    counts["done"] += len(step_rows)
    approval = _read(store, store.run_path(run_id, APPROVAL_FILE))
    waiting = bool(approval and approval.get("state") == "waiting")
    if waiting and (approval.get("deadline") or "9999") < dt.datetime.now(dt.UTC).isoformat(
            timespec="seconds"):  # a suspended run past its timeout never came back to say so
        waiting, approval = False, {**approval, "state": "timed out"}
    plan = _read(store, layout.cost_plan_path(store, run_id))
    # what was spent is the stages' (a step's summary repeats the cost of the stages in it)
    spent = [s.get("est_cost_usd") or 0.0 for s in stages]
    if versions is None:
        versions = published_versions(store)
    if counts["running"]:
        state = "running"
    elif counts["failed"] or counts["crashed"]:
        state = "failed"
    elif waiting:
        state = "awaiting approval"
    elif counts["done"] or record:
        state = "finished"
    else:
        state = "empty"
    return {
        "run_id": run_id,
        "state": state,
        "started": record.get("created_at") or _earliest(store, files),
        "updated": record.get("updated_at"),
        "stages": stages,
        "steps": step_rows,
        "counts": {"done": counts["done"], "running": counts["running"],
                   "failed": counts["failed"] + counts["crashed"]},
        "awaiting_approval": waiting,
        "approval": approval,
        "published": versions.get(run_id, []),
        "cost_usd": round(sum(spent), 6),
        "planned_cost_usd": (plan or {}).get("total_usd"),
    }


def _earliest(store: Store, files: list[str]) -> str | None:
    """No run record: the oldest file's time, if the filesystem tells it."""
    times = []
    for path in files[:50]:
        try:
            info = store.fs.info(path)
        except (FileNotFoundError, OSError):
            continue
        when = info.get("mtime") or info.get("LastModified") or info.get("created")
        if isinstance(when, int | float):
            when = dt.datetime.fromtimestamp(when, dt.UTC)
        if isinstance(when, dt.datetime):
            times.append(when.astimezone(dt.UTC))
    return min(times).isoformat() if times else None


def list_run_status(store: Store) -> list[dict[str, Any]]:
    """Every run of the store, oldest first (run ids sort by time when gleaner made them)."""
    versions = published_versions(store)
    out = []
    for run_id in store.list_runs():
        try:
            out.append(run_status(store, run_id, versions))
        except (UnknownRun, ValueError):  # an empty folder, or not a run id
            continue
    return out


# ---- text ------------------------------------------------------------------------------------
def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso[:16]


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _published(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['dataset']} {e['label']}" for e in entries) or "-"


def runs_table(runs: list[dict[str, Any]]) -> str:
    header = ("run", "started (UTC)", "state", "done", "running", "failed", "approval",
              "published", "cost")
    rows = [header] + [(
        r["run_id"], _when(r["started"]), r["state"], str(r["counts"]["done"]),
        str(r["counts"]["running"]), str(r["counts"]["failed"]),
        "waiting" if r["awaiting_approval"] else (r["approval"] or {}).get("state", "-"),
        _published(r["published"]), _money(r["cost_usd"])) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def run_text(status: dict[str, Any]) -> str:
    lines = [f"run {status['run_id']}: {status['state']}",
             f"started {_when(status['started'])} UTC, last recorded "
             f"{_when(status['updated'])} UTC",
             f"cost {_money(status['cost_usd'])} (planned {_money(status['planned_cost_usd'])})"]
    approval = status["approval"]
    if approval:
        lines.append(f"approval: {approval.get('state')}"
                     + (f" of {approval['what']}" if approval.get("what") else "")
                     + (f" since {_when(approval.get('requested_at'))} UTC"
                        if approval.get("state") == "waiting" else ""))
    for entry in status["published"]:
        lines.append(f"published {entry['dataset']} {entry['label']} "
                     f"({entry.get('examples')} examples) {entry.get('uri') or ''}".rstrip())
    if status["stages"]:
        lines.append("stages:")
        for s in status["stages"]:
            counts = (f"{s.get('ok', 0)} ok, {s.get('failed', 0)} failed of "
                      f"{s.get('examples', 0)}" if "examples" in s else "")
            detail = "; ".join(x for x in (counts, s["why"]) if x)
            cost = f" {_money(s.get('est_cost_usd'))}" if s.get("est_cost_usd") else ""
            lines.append(f"  {s['stage']:<28} {s['state']:<8}{cost}"
                         + (f"  {detail}" if detail else ""))
    if status["steps"]:
        lines.append("steps: " + ", ".join(
            f"{s['step']}" + (" (reused)" if s.get("reused") else "") for s in status["steps"]))
    return "\n".join(lines)
