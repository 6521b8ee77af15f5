"""Approval before publishing (``publish.approval: required``): the gate, the decision, the lock.

A curate run whose selection is done stops before its dataset version is published:

- **the gate** (:func:`approval_gate`, in the curate flow): marks the run waiting
  (runs/<id>/approval.json, gleaner.runs.request_approval, with the Prefect flow run id),
  shows what waits as a markdown artifact (counts, the change against the current version,
  a sample of added and removed examples with their selection reasons, the cost so far) and
  pauses the flow run with an input form (:class:`ApprovalInput`: approve, by, comment).
  A run started in a process of its own (the CLI) is *paused*: it waits in its process. A
  deployment run is *suspended*: its process exits, the worker and the deployment's
  concurrency slot are free; on resume Prefect schedules it again, the flow re-enters, every
  stage before the gate reuses its output and the gate returns the input it was resumed with;
- **the decision**: the UI's form, or ``gleaner approve`` (:func:`answer_approval`), resumes
  the flow run with the input; the run records who, when and the comment (gleaner.runs.
  decide_approval, with the change against the version current at that moment) and
  publishes, or ends in a Completed state named ``Not published`` (rejected, timed out,
  superseded): the current version stays current;
- **superseding**: a run reaching the gate for a dataset ends every older run still waiting
  for that dataset (``superseded``; resumed with a rejection so it ends unpublished);
- **the lock** (:func:`publish_lock`): one publish per dataset at a time, whatever the
  deployment's concurrency slot does (a waiting run does not hold it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import posixpath
import sys
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.input import RunInput
from pydantic import Field

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.lease import Lease, LeaseHeld
from gleaner.engine.step import publish_markdown
from gleaner.runs import decide_approval, read_approval, request_approval
from gleaner.store import Store
from gleaner.tasks.publish.versions import dataset_dir, list_versions, read_version

PAUSE_KEY = "publish-approval"  # one gate per flow run: a resumed deployment run re-enters it
POLL_S = 3  # how often a paused CLI run asks the API whether it was resumed
SAMPLE = 5  # added and removed examples shown
NOT_PUBLISHED = "Not published"  # the name of the final state of a run that did not publish
LOCK_FILE = "_publish.lock"


class ApprovalError(ValueError):
    """An approval that cannot be given: the run is not waiting, or no longer can."""


class ApprovalInput(RunInput):
    """The form on a flow run waiting for approval (Prefect UI: Resume)."""

    approve: bool = Field(False, description="Publish this dataset version (unticked: reject)")
    by: str = Field(..., min_length=1,
                    description="Your name: recorded with the decision in the version's card")
    comment: str = Field("", description="Why: recorded with the decision in the version's card")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- what waits: the change against the current version --------------------------------------


def _text(row: dict[str, Any], width: int = 100) -> str:
    text = " ".join(str(row.get("instruction") or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def change_against_current(store: Store, dataset: str, run_id: str, sample: int = SAMPLE
                           ) -> dict[str, Any]:
    """This run's curated set against the dataset's current version: counts (+added, -removed,
    =kept) and a sample of added and removed examples with their selection reasons."""
    current = next(reversed(list_versions(store, dataset)), None)
    curated = store.read_stage(run_id, layout.CURATED, columns=["id", "instruction"])
    new = {row["id"]: row for row in curated.to_pylist()}
    old: dict[str, dict[str, Any]] = {}
    if current is not None:
        table = read_version(store, dataset, current["version"]).select(["id", "instruction"])
        old = {row["id"]: row for row in table.to_pylist()}
    why: dict[str, tuple[str, float | None]] = {}
    if store.has_stage(run_id, layout.SELECT):
        manifest = store.read_stage(run_id, layout.SELECT, columns=["id", "reason", "score"])
        why = {row["id"]: (row["reason"], row["score"]) for row in manifest.to_pylist()}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))

    def entry(example_id: str, row: dict[str, Any], absent: str) -> dict[str, Any]:
        reason, score = why.get(example_id, (absent, None))
        return {"id": example_id, "instruction": _text(row), "reason": reason,
                "score": None if score is None else round(float(score), 4)}

    return {
        "dataset": dataset, "run_id": run_id, "computed_at": _now().isoformat(),
        "current": None if current is None else {
            "version": current["version"], "label": current["label"], "run_id": current["run_id"]},
        "examples": len(new), "added": len(added), "removed": len(removed),
        "kept": len(set(new) & set(old)),
        "added_sample": [entry(i, new[i], "kept") for i in added[:sample]],
        "removed_sample": [entry(i, old[i], "not in this run's pool") for i in removed[:sample]],
    }


def change_counts(change: dict[str, Any]) -> dict[str, Any]:
    return {k: change[k] for k in ("current", "examples", "added", "removed", "kept",
                                   "computed_at")}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def approval_markdown(run_id: str, summary: dict[str, Any], change: dict[str, Any],
                      cost: dict[str, Any] | None, deadline: str) -> str:
    """The artifact a person reads before deciding."""
    ingest, rate, select = (summary.get("ingest") or {}, summary.get("rate") or {},
                            summary.get("select") or {})
    current = change["current"]
    against = (f"{current['label']} (run `{current['run_id']}`)" if current
               else "nothing (the first version)")
    lines = [
        f"# Approve dataset `{change['dataset']}` from run `{run_id}`?",
        "",
        f"Waiting for a decision until {deadline} UTC; then the run ends not published.",
        "Decide with **Resume** on this flow run (approve, your name, a comment), or "
        f"`gleaner approve {run_id} [--reject] --comment TEXT`.",
        "", "| what | examples |", "|---|---:|",
        f"| read | {ingest.get('read', '—')} |",
        f"| kept after ingest | {ingest.get('kept', '—')} |",
        f"| rated ok | {rate.get('rated', '—')} |",
        f"| selected | {select.get('selected', change['examples'])} |",
        "",
        f"## Change against {against}",
        "",
        f"**+{change['added']:,} added / −{change['removed']:,} removed / "
        f"={change['kept']:,} kept** ({change['examples']:,} examples). Computed when the run "
        "reached the gate; the decision records the change against the version current when "
        "it is made.",
    ]
    for title, rows in (("Added (sample)", change["added_sample"]),
                        ("Removed (sample)", change["removed_sample"])):
        if not rows:
            continue
        lines += ["", f"### {title}", "", "| id | instruction | reason | score |",
                  "|---|---|---|---:|"]
        lines += [f"| `{r['id'][:12]}` | {_cell(r['instruction'])} | {_cell(r['reason'])} | "
                  f"{'—' if r['score'] is None else r['score']} |" for r in rows]
    if cost is not None:
        spent = cost.get("usd")
        lines += ["", f"## Cost so far: {'—' if spent is None else f'${spent:,.4f}'} spent "
                  f"(${cost.get('planned_usd') or 0:,.4f} planned)"]
    return "\n".join(lines)


# ---- the gate (in the curate flow) -------------------------------------------------------------


def approval_gate(config: GleanerConfig, run_id: str, summary: dict[str, Any],
                  cost: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Wait for a person before publishing. None: nothing to wait for (``approval: none``, or
    this run already published); else the approval record, whose ``state`` is ``approved``
    (publish) or ``rejected`` / ``timed out`` / ``superseded`` (do not)."""
    if config.publish.approval != "required":
        return None
    from prefect.context import FlowRunContext

    store = Store(config.store.url, config.store.options)
    dataset = config.curate.dataset_name
    if already_published(config, store, run_id):
        return None  # a rerun: the publish step reuses the version this run published
    from gleaner.tasks.publish.release import PublishStep

    curated = PublishStep(config, store, run_id, {}, None).curated  # what would be published
    record = read_approval(store, run_id)
    if record is not None and record.get("state") == "approved" \
            and record.get("curated") == curated:
        return record  # these examples approved, then stopped before publishing: publish
    context = FlowRunContext.get()
    current = context.flow_run if context is not None else None
    flow_run_id = str(current.id) if current is not None else None
    deployment = current is not None and current.deployment_id is not None
    timeout_s = config.publish.approval_timeout_s
    if record is None or flow_run_id is None or record.get("flow_run_id") != flow_run_id:
        supersede_waiting(store, dataset, run_id)
        change = change_against_current(store, dataset, run_id)
        deadline = (_now() + dt.timedelta(seconds=timeout_s)).isoformat(timespec="seconds")
        request_approval(store, run_id, "publish", dataset=dataset, flow_run_id=flow_run_id,
                         curated=curated,
                         api_url=_api_url(), deployment=deployment, timeout_s=timeout_s,
                         deadline=deadline, change=change_counts(change))
        publish_markdown(f"approval-{run_id}",
                         approval_markdown(run_id, summary, change, cost, deadline[:19]),
                         f"dataset {dataset} of run {run_id}: waiting for approval")
        _announce(run_id, dataset, deployment, deadline)
    # else: a suspended deployment run resumed and re-entering: the input is there
    answer = _wait(deployment, timeout_s)
    record = read_approval(store, run_id) or {}
    if record.get("state") in ("superseded", "timed out"):
        return record  # another run (or gleaner approve past the deadline) ended this one
    if answer is None:
        return decide_approval(store, run_id, False, by=None, state="timed out",
                               note=f"no decision within {timeout_s}s")
    change = change_against_current(store, dataset, run_id)
    return decide_approval(store, run_id, answer.approve, by=answer.by,
                           note=answer.comment or None, change=change_counts(change))


def already_published(config: GleanerConfig, store: Store, run_id: str) -> bool:
    """The run published this selection already (the publish step's own done rule)."""
    from gleaner.engine.plan import PlanMismatch
    from gleaner.engine.step import check_step
    from gleaner.tasks.publish.release import PublishStep

    if not any(v["run_id"] == run_id for v in list_versions(store, config.curate.dataset_name)):
        return False
    try:
        return check_step(store, run_id, PublishStep(config, store, run_id, {}, None)) is not None
    except PlanMismatch:
        return False


def _announce(run_id: str, dataset: str, deployment: bool, deadline: str) -> None:
    from prefect.logging import get_run_logger

    how = "suspended (its worker is free)" if deployment else "paused"
    text = (f"run {run_id} waits for approval to publish dataset {dataset} until "
            f"{deadline[:19]} UTC: {how}; decide in the Prefect UI (Resume) or with "
            f"`gleaner approve {run_id} [--reject] --comment TEXT`")
    get_run_logger().info(text)
    if not deployment:  # the CLI's terminal
        sys.stderr.write(text + "\n")


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _wait(deployment: bool, timeout_s: int) -> ApprovalInput | None:
    """The input the flow run was resumed with; None when the timeout passed first."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run, suspend_flow_run

    if deployment:  # exits this process (the first time); returns the input on re-entry
        return suspend_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, key=PAUSE_KEY)
    try:
        return pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s,
                              poll_interval=POLL_S, key=PAUSE_KEY)
    except FlowPauseTimeout:
        from prefect.context import FlowRunContext
        from prefect.states import Running

        # Prefect fails a run whose pause expired on its next state; the run goes on to end
        # itself not published, so it is set running again first.
        context = FlowRunContext.get()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(context.flow_run.id, Running(), force=True)
        return None


def not_published_state(summary: dict[str, Any]) -> Any:
    """The final state of a curate run that did not publish: Completed (the run did its
    work, and its summary is its result), named ``Not published`` with why."""
    from prefect.states import Completed

    return Completed(name=NOT_PUBLISHED, message=not_published_message(summary["approval"]),
                     data=summary)


def not_published_message(record: dict[str, Any]) -> str:
    state = record.get("state")
    if state == "rejected":
        why = f"rejected by {record.get('by') or 'someone'}"
    elif state == "superseded":
        why = f"superseded by run {record.get('superseded_by')}, which reached the gate later"
    elif state == "timed out":
        why = f"no decision within {record.get('timeout_s')}s"
    else:
        why = str(state)
    note = record.get("note")
    return (f"Not published: {why}" + (f": {note}" if note and state == "rejected" else "")
            + "; the current version stays current")


# ---- ending another run that waits ---------------------------------------------------------------


def _end_unpublished(flow_run_id: str | None, message: str, resume_input: dict[str, Any]
                     ) -> None:
    """Resume a waiting flow run with a rejection (it ends itself not published); when it can
    no longer resume (its pause expired, its process is gone), set it ``Not published``."""
    if not flow_run_id:
        return
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Completed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is None or run.state.type != StateType.PAUSED:
            return
        expired = (run.state.state_details.pause_timeout is not None
                   and run.state.state_details.pause_timeout < _now())
        if not expired:
            result = client.resume_flow_run(run.id, run_input=resume_input)
            if result.status == SetStateStatus.ACCEPT:
                return
        client.set_flow_run_state(run.id, Completed(name=NOT_PUBLISHED, message=message),
                                  force=True)


def supersede_waiting(store: Store, dataset: str, run_id: str) -> list[str]:
    """End every other run waiting to publish ``dataset``: ``superseded`` by ``run_id``."""
    ended = []
    for other in store.list_runs():
        record = read_approval(store, other) if other != run_id else None
        if not record or record.get("state") != "waiting" or record.get("dataset") != dataset:
            continue
        note = f"superseded by run {run_id}"
        decide_approval(store, other, False, by="gleaner", note=note, state="superseded",
                        superseded_by=run_id)
        with contextlib.suppress(Exception):  # the record says it; the run ends either way
            _end_unpublished(record.get("flow_run_id"),
                             f"Not published: {note}, which reached the gate later",
                             {"approve": False, "by": "gleaner", "comment": note})
        ended.append(other)
    return ended


# ---- gleaner approve ---------------------------------------------------------------------------


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def answer_approval(store: Store, run_id: str, approve: bool, by: str | None = None,
                    comment: str | None = None) -> dict[str, Any]:
    """Resume the flow run waiting for approval of ``run_id`` with a decision (it publishes,
    or ends not published, itself). Raises :class:`ApprovalError` when the run is not
    waiting (never asked, decided already, its flow run no longer paused, past its timeout)."""
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus

    record = read_approval(store, run_id)
    if record is None:
        raise ApprovalError(f"run {run_id!r} is not waiting for an approval: it never asked "
                            "for one (publish.approval: required makes curate ask)")
    if record.get("state") != "waiting":
        who = f" by {record['by']}" if record.get("by") else ""
        raise ApprovalError(f"run {run_id!r} is not waiting for an approval: "
                            f"{record.get('state')}{who} at {record.get('decided_at')}")
    by = by or default_user()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(record["flow_run_id"]))
        if run.state is None or run.state.type != StateType.PAUSED:
            state = run.state.name if run.state else "without a state"
            raise ApprovalError(f"run {run_id!r} is not waiting for an approval: its flow run "
                                f"{run.name} is {state} (decided already?)")
        deadline = run.state.state_details.pause_timeout
        if deadline is not None and deadline < _now():
            timed_out = decide_approval(store, run_id, False, state="timed out",
                                        note=f"no decision within {record.get('timeout_s')}s")
            _end_unpublished(record["flow_run_id"], not_published_message(timed_out), {})
            raise ApprovalError(f"run {run_id!r} waited past its approval timeout "
                                f"({deadline.isoformat(timespec='seconds')}): it ends not "
                                "published")
        change = change_against_current(store, record["dataset"], run_id)
        result = client.resume_flow_run(run.id, run_input={
            "approve": approve, "by": by, "comment": comment or ""})
        if result.status != SetStateStatus.ACCEPT:
            reason = getattr(result.details, "reason", None) or result.status.value
            raise ApprovalError(f"run {run_id!r}: Prefect did not resume flow run {run.name}: "
                                f"{reason}")
    return {"run_id": run_id, "flow_run_id": record["flow_run_id"], "flow_run": run.name,
            "approved": approve, "by": by, "comment": comment, "dataset": record["dataset"],
            "change": change_counts(change)}


# ---- one publish per dataset at a time -------------------------------------------------------


@contextlib.contextmanager
def publish_lock(store: Store, dataset: str, run_id: str, wait_s: float = 600.0,
                 poll_s: float = 1.0) -> Iterator[None]:
    """Hold ``datasets/<name>/_publish.lock`` while publishing: the store's lease (created
    exclusively, heartbeated, a dead holder's taken over, only its own released); another
    live holder is waited for up to ``wait_s``."""
    lease = Lease(store, run_id, f"publish of {dataset}", wait_s=wait_s, poll_s=poll_s,
                  path=posixpath.join(dataset_dir(store, dataset), LOCK_FILE))
    try:
        lease.acquire()
    except LeaseHeld as error:
        raise TimeoutError(f"dataset {dataset!r}: not published within {wait_s:.0f}s: "
                           f"{error}") from None
    try:
        yield
    finally:
        lease.release()
