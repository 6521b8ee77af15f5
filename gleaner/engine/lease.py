"""One runner per stage of a run: a lease file in the store, created atomically.

A second ``gleaner rate`` (or a second deployment run) on the same run id
would otherwise send every request again. The first runner creates
``runs/<id>/_leases/<stage>.json`` exclusively (O_EXCL locally, a conditional
PUT on S3) with its owner (host, pid, a random runner id) and refreshes a
heartbeat in it; another runner finds the file and refuses, naming the holder,
unless the heartbeat is older than ``ttl_s`` or the holder is a process of
this host that no longer exists (it died without releasing), in which case it
takes the lease over.

The lease also records the Prefect flow run that holds it: taking over a stale
lease sets that flow run ``Crashed`` ("taken over by <flow run>"), so the UI
shows no dead run as ``Running`` (gleaner.flow_runs).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import threading
import time
from typing import Any

from gleaner import layout
from gleaner.store import Store


class LeaseHeld(RuntimeError):
    """Another runner is running this stage of this run right now."""


def _now() -> float:
    return time.time()


def holder_is_stale(holder: dict[str, Any], ttl_s: float = 60.0) -> bool:
    """A lease holder that stopped heartbeating (older than its ``ttl_s``), or a process of
    this host that no longer exists (killed -9): it holds nothing."""
    if _now() - float(holder.get("heartbeat", 0)) > float(holder.get("ttl_s", ttl_s)):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class Lease:
    """``with Lease(store, run_id, stage):`` holds the stage for this process. ``path``: a
    lease on something else of the store (a dataset's publishing); ``wait_s``: wait that
    long for a live holder instead of refusing at once."""

    def __init__(self, store: Store, run_id: str, stage: str, ttl_s: float = 60.0,
                 heartbeat_s: float = 10.0, path: str | None = None, wait_s: float = 0.0,
                 poll_s: float = 1.0):
        self.store, self.run_id, self.stage = store, run_id, stage
        self.path = path or layout.lease_path(store, run_id, stage)
        self.wait_s, self.poll_s = wait_s, poll_s
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        from gleaner.flow_runs import current_flow_run_id

        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "runner": secrets.token_hex(6), "flow_run": current_flow_run_id()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _document(self) -> bytes:
        now = _now()
        return json.dumps({**self.owner, "stage": self.stage, "run_id": self.run_id,
                           "heartbeat": now, "ttl_s": self.ttl_s,
                           "heartbeat_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat()}
                          ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        tries = 0
        while tries < 3:
            tries += 1
            if self.store.create_exclusive(self.path, self._document()):
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            age = _now() - float(holder.get("heartbeat", 0))
            if holder_is_stale(holder, self.ttl_s):
                self.store.delete(self.path)  # the holder stopped heartbeating: take over
                self._took_over(holder)
                continue
            if time.monotonic() < deadline:  # a live holder: wait for it
                time.sleep(self.poll_s)
                tries = 0
                continue
            raise LeaseHeld(
                f"stage {self.stage!r} of run {self.run_id!r} is being run by "
                f"{holder.get('host')} pid {holder.get('pid')} (runner {holder.get('runner')}"
                + (f", run {holder.get('run_id')!r}" if holder.get("run_id") != self.run_id
                   else "") + "), "
                f"last heartbeat {age:.0f}s ago; wait for it to finish, or for its lease to go "
                f"stale ({self.ttl_s:.0f}s without a heartbeat) if it died"
            )
        raise LeaseHeld(f"could not take the lease of stage {self.stage!r} of run "
                        f"{self.run_id!r}: it changed hands while trying")

    def _took_over(self, holder: dict[str, Any]) -> None:
        """The dead holder's flow run ends Crashed in the Prefect UI, not Running forever."""
        previous, mine = holder.get("flow_run"), self.owner.get("flow_run")
        if previous and previous != mine:
            from gleaner.flow_runs import crash_flow_run

            crash_flow_run(previous, f"taken over by {mine or 'runner ' + self.owner['runner']}"
                           f" (stage {self.stage!r} of run {self.run_id!r}: its lease went "
                           "stale)")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                holder = self._read()
                if holder is None or holder.get("runner") != self.owner["runner"]:
                    return  # taken over: the stage's writes stay idempotent per part
                self.store.write_bytes(self.path, self._document())

        self._thread = threading.Thread(target=beat, daemon=True, name=f"lease-{self.stage}")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("runner") == self.owner["runner"]:
            self.store.delete(self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
