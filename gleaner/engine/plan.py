"""The plan of a stage: which settings made its parts, and how the input was cut.

A rerun resumes only when it would make the same rows: the same requested
settings, the same input and the same batch size (otherwise "part i exists"
would mean another batch). Two checks, because a stage may *resolve* its
settings at run time (rating asked for score-only may have to fall back to
explain on an endpoint without logprobs):

1. before anything is sent: the requested settings and the batching must match
   the plan on record;
2. when the stage resolves its settings (only if work is pending): the resolved
   settings must match the resolved settings on record.

A finished stage therefore reruns cleanly: nothing is pending, nothing is
resolved again, the recorded resolved settings stand. A mismatch names the
fields that differ; ``force`` clears the stage and starts afresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from gleaner import layout
from gleaner.store import Store


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of settings (the cache key's and the plan's identity)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class PlanMismatch(ValueError):
    """A rerun asks for other settings than the parts on record were made with."""


@dataclass
class Plan:
    stage: str
    requested: dict[str, Any]
    batching: dict[str, Any]  # input stage, rows, input fingerprint, batch size
    resolved: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The identity of the rows: resolved settings (or requested, before resolution)."""
        return settings_key(self.resolved if self.resolved is not None else self.requested)

    def as_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "requested": self.requested, "batching": self.batching,
                "resolved": self.resolved, "key": self.key, **self.extra}


def read_plan(store: Store, run_id: str, stage: str) -> dict[str, Any] | None:
    path = layout.plan_path(store, run_id, stage)
    return store.read_json(path) if store.exists(path) else None


def write_plan(store: Store, run_id: str, plan: Plan) -> None:
    store.write_json(layout.plan_path(store, run_id, plan.stage), plan.as_json())


def check_requested(store: Store, run_id: str, plan: Plan, follows_input: bool = False
                    ) -> dict[str, Any] | None:
    """The plan on record when it matches ``plan``'s requested settings and batching.

    None when the stage has no plan yet (or no parts: nothing to be consistent with).
    Raises :class:`PlanMismatch` naming the differing fields otherwise. A stage that
    ``follows_input`` (its input is rebuilt from other stages, e.g. answer pairs) starts
    afresh when only its input changed: its cache keeps what is still the same.
    """
    previous = read_plan(store, run_id, plan.stage)
    if previous is None or not store.has_stage(run_id, plan.stage):
        return None
    if follows_input and not changed_fields(previous.get("requested") or {}, plan.requested) \
            and changed_fields(previous.get("batching") or {}, plan.batching):
        store.clear_stage(run_id, plan.stage)
        return None
    differing = [f"settings.{k}" for k in changed_fields(previous.get("requested") or {},
                                                         plan.requested)]
    differing += [f"batching.{k}" for k in changed_fields(previous.get("batching") or {},
                                                          plan.batching)]
    if differing:
        raise PlanMismatch(
            f"run {run_id!r} already has {plan.stage} output made with other settings "
            f"({', '.join(differing)}); rerun with the same settings to resume, "
            "or --force to start the stage afresh"
        )
    return previous


def check_resolved(previous: dict[str, Any] | None, plan: Plan, run_id: str) -> None:
    """The settings resolved now must be those the finished parts were made with."""
    if previous is None or previous.get("resolved") is None or plan.resolved is None:
        return
    differing = changed_fields(previous["resolved"], plan.resolved)
    if differing:
        detail = ", ".join(f"{k}: {previous['resolved'].get(k)!r} -> {plan.resolved.get(k)!r}"
                           for k in differing)
        raise PlanMismatch(
            f"run {run_id!r}: {plan.stage} resolves to other settings than its finished parts "
            f"were made with ({detail}); --force to start the stage afresh"
        )
