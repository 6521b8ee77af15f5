"""The Prefect UI tells the truth about dead runs.

A flow run whose process died (kill -9, out of memory, a lost node) cannot say
so itself. Two things end it ``Crashed`` instead of ``Running`` forever:

- **Prefect's zombie detection**: every flow run sends a heartbeat event
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 180 s by default since Prefect 3.6.22),
  and an automation on the server (:func:`ensure_zombie_automation`, created once
  by gleaner on the API it uses, named :data:`ZOMBIE_AUTOMATION`) sets a run
  ``Crashed`` when no heartbeat or state event follows the last heartbeat within
  :data:`MISSED_HEARTBEATS` heartbeats;
- **a lease takeover** (gleaner.engine.lease): the lease of a stage records its
  holder's flow run; a rerun that takes over a stale lease sets that flow run
  ``Crashed`` with "taken over by <flow run>" (:func:`crash_flow_run`), at once.

Neither ever fails the work: without a Prefect API (a stage run outside a flow),
or when the API refuses, they log and go on.
"""

from __future__ import annotations

import datetime as dt
import logging

log = logging.getLogger("gleaner.flow_runs")
ZOMBIE_AUTOMATION = "gleaner: crash flow runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3  # heartbeats missed before a run is a zombie (Prefect Cloud's choice)
_ensured: set[str] = set()


def current_flow_run_id() -> str | None:
    """The flow run this code runs in (None outside one)."""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
    except Exception:  # no Prefect context at all
        return None
    if context is None or context.flow_run is None:
        return None
    return str(context.flow_run.id)


def crash_flow_run(flow_run_id: str, message: str) -> bool:
    """Set a flow run ``Crashed`` with ``message`` if it is not already in a final state;
    True when it was set."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return False
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
            log.warning("flow run %s (%s) set Crashed: %s", run.name, flow_run_id, message)
            return True
    except Exception as error:  # the UI's truth never fails the work
        log.warning("could not set flow run %s Crashed (%s): %s", flow_run_id,
                    type(error).__name__, error)
        return False


def heartbeat_seconds() -> int | None:
    """The heartbeat interval flow runs of this process send (None: heartbeats off)."""
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def zombie_automation():  # -> prefect.automations.Automation
    """Prefect's documented zombie detection (docs: "detect zombie flows"): after a flow
    run's heartbeat, expect any event of that run within :data:`MISSED_HEARTBEATS`
    heartbeats, or set it ``Crashed``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = MISSED_HEARTBEATS * (heartbeat_seconds() or 180)
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Created by gleaner (gleaner/flow_runs.py): a flow run whose process "
                    f"died stops sending heartbeats; after {within}s without one it is Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {within}s: its process died (killed, out of memory, "
                    "or its node was lost)")],
    )


def ensure_zombie_automation() -> bool:
    """Create :data:`ZOMBIE_AUTOMATION` on the current Prefect API unless it is there (once
    per API and process); True when it is there now."""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url or "")
    if not api or api in _ensured:
        return bool(api)
    if heartbeat_seconds() is None:
        log.warning("PREFECT_FLOWS_HEARTBEAT_FREQUENCY is off: a flow run whose process dies "
                    "stays Running in the Prefect UI; set it (180) to detect them")
        return False
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            if not client.read_automations_by_name(ZOMBIE_AUTOMATION):
                zombie_automation().create()
        _ensured.add(api)
        return True
    except Exception as error:  # an API without automations still runs flows
        log.warning("could not create the Prefect automation %r (%s): %s; dead flow runs "
                    "stay Running in the UI", ZOMBIE_AUTOMATION, type(error).__name__, error)
        return False
