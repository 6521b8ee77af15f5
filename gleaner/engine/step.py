"""A step that makes its output whole (not in batches), on the same contract as a stage.

Ingest, selection, a dataset version, a training run, a pairwise evaluation, the
comparison data, MT-Bench and a grid arm each make one output at once. They share the
batched stages' rules (gleaner.engine.plan) through one function, :func:`run_step`:

- **the key**: a hash of the settings that make the output (``Step.settings()``),
  kept with the step's summary in ``runs/<id>/steps/<name>.json``;
- **done**: the record's key matches and the output is there (``Step.done``): the
  stored summary comes back marked ``reused``; nothing runs and nothing is sent;
- **another key**: refused, naming the changed settings (``PlanMismatch``), unless
  ``force`` (``Step.clear``, then afresh);
- **other inputs** (``Step.inputs()``: the versions of what it reads, e.g. a retrained model,
  a refreshed stage, other training data): made again from the start (``Step.clear``), as a
  stage that follows its input is; what is unchanged below it (answers, judgements) is
  reused by its own cache;
- **an output made before steps kept records** is adopted when it is what the step would
  make (``Step.adopt``), so an older store is not redone;
- **extent**: a step whose work grows by units (a training run's steps) keeps that
  out of its key: more units than on record continue from the record (the trainer
  resumes from its checkpoint), fewer are refused;
- **one summary**: what ``Step.run`` returns plus ``step``, ``key``, ``reused`` and
  ``seconds``; **one artifact** (:func:`publish_markdown`), which never fails a
  finished step.
"""

from __future__ import annotations

import abc
import contextlib
import posixpath
import time
from typing import Any, ClassVar

from gleaner.engine.plan import PlanMismatch, changed_fields, settings_key
from gleaner.store import Store

STEPS_DIR = "steps"


def step_record_path(store: Store, run_id: str, name: str) -> str:
    return posixpath.join(store.run_path(run_id, STEPS_DIR), f"{name.replace('/', '__')}.json")


def read_step(store: Store, run_id: str, name: str) -> dict[str, Any] | None:
    path = step_record_path(store, run_id, name)
    return store.read_json(path) if store.exists(path) else None


def step_records(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """Every step record of the run, by step name."""
    try:
        paths = store.fs.glob(posixpath.join(store.run_path(run_id, STEPS_DIR), "*.json"))
    except FileNotFoundError:
        return {}
    records = (store.read_json(path) for path in sorted(paths))
    return {record["step"]: record for record in records if record.get("step")}


def publish_markdown(key: str, markdown: str, description: str,
                     table: list[dict[str, Any]] | None = None) -> None:
    """A markdown artifact (and a table artifact, ``<key>-table``, when ``table`` is given)
    in the running flow's UI; outside a flow run, or when the API refuses, nothing: the UI's
    copy never fails the work it shows."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from gleaner.artifacts import artifact_key

        create_markdown_artifact(key=artifact_key(key), markdown=markdown,
                                 description=description)
        if table is not None:
            create_table_artifact(key=artifact_key(key)[:94] + "-table", table=table)


class Step(abc.ABC):
    """One output made at once: what makes it (``settings``), whether it is there, how."""

    kind: ClassVar[str] = ""  # ingest | select | publish | train | arm ... (the record's name)
    description: ClassVar[str] = ""
    artifact: ClassVar[str] = ""  # its artifact's key, before the run id (default: its name)
    # how a person makes it afresh, named in a refusal (a CLI flag or a config key)
    force_hint: ClassVar[str] = "--force"

    @property
    def name(self) -> str:
        """The record's name within the run (a training run adds its model's name)."""
        return self.kind

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """What makes the output: a change here means another output (refused)."""

    def inputs(self) -> dict[str, Any]:
        """The versions of what it reads: a change here makes it again (default: none)."""
        return {}

    def extent(self) -> int | None:
        """Units of work asked for, outside the key (a training run's steps); None: none."""
        return None

    def done(self, store: Store, run_id: str) -> bool:
        """The output is in the store (the record alone is not enough)."""
        return True

    def clear(self, store: Store, run_id: str) -> None:  # noqa: B027 (optional hook)
        """Remove the output before it is made afresh (forced, or other inputs)."""

    def adopt(self, store: Store, run_id: str) -> dict[str, Any] | None:
        """The summary of an output made before steps kept records, when it is what this
        step would make (then it is recorded and reused); None: make it."""
        return None

    @abc.abstractmethod
    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        """Make the output; ``resume``: continue what the record holds (more extent)."""

    def markdown(self, summary: dict[str, Any]) -> str | None:
        """The step's artifact (None: none)."""
        return None


def check_step(store: Store, run_id: str, step: Step, force: bool = False
               ) -> dict[str, Any] | None:
    """The record when ``step`` is done (nothing to run); None when it must run.

    Raises :class:`PlanMismatch` when the record was made with other settings (or more
    extent than asked) and ``force`` is not given."""
    record = None if force else read_step(store, run_id, step.name)
    if record is None:
        return None
    settings = step.settings()
    differing = changed_fields(record.get("settings") or {}, settings)
    if differing:
        raise PlanMismatch(
            f"run {run_id!r} already has {step.name} made with other settings "
            f"({', '.join(differing)}); rerun with the same settings, "
            f"or {step.force_hint} to make it afresh")
    asked, held = step.extent(), record.get("extent")
    if asked is not None and held is not None and asked < held:
        raise PlanMismatch(
            f"run {run_id!r}: {step.name} holds {held} steps of work and {asked} were asked; "
            f"a run cannot be made shorter: {step.force_hint} to make it afresh")
    if record.get("inputs", {}) != step.inputs():
        return None
    if (asked is None or held is None or asked == held) and step.done(store, run_id):
        return record
    return None


def _record(store: Store, run_id: str, step: Step, summary: dict[str, Any], seconds: float
            ) -> dict[str, Any]:
    """The step's record (its summary with the engine's fields), written."""
    key = settings_key(step.settings())
    summary = {**summary, "step": step.name, "key": key, "reused": False,
               "seconds": round(seconds, 2)}
    record = {"step": step.name, "key": key, "settings": step.settings(),
              "inputs": step.inputs(), "extent": step.extent(), "summary": summary}
    store.write_json(step_record_path(store, run_id, step.name), record)
    return record


def run_step(store: Store, run_id: str, step: Step, *, force: bool = False) -> dict[str, Any]:
    """Run ``step`` unless it is done (see the module); its summary, recorded and shown."""
    record = check_step(store, run_id, step, force)
    if record is not None:
        return {**record["summary"], "reused": True}
    previous = None if force else read_step(store, run_id, step.name)
    if previous is None and not force:
        adopted = step.adopt(store, run_id)
        if adopted is not None:
            return {**_record(store, run_id, step, adopted, 0.0)["summary"], "reused": True}
    other_inputs = previous is not None and previous.get("inputs", {}) != step.inputs()
    if force or other_inputs:  # the record goes first: an attempt killed half-way leaves none
        path = step_record_path(store, run_id, step.name)
        if store.exists(path):
            store.fs.rm(path)
        step.clear(store, run_id)
    started = time.perf_counter()
    summary = step.run(store, run_id, resume=previous is not None and not other_inputs)
    summary = _record(store, run_id, step, summary, time.perf_counter() - started)["summary"]
    markdown = step.markdown(summary)
    if markdown is not None:
        publish_markdown(f"{step.artifact or step.name}-{run_id}", markdown,
                         step.description or f"{step.name} of run {run_id}")
    return summary
