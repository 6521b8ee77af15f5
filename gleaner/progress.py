"""Progress of long stages: a bar in a terminal, plain periodic lines elsewhere.

Rating 52k examples takes hours; a person at a terminal wants done/total, the
rate and an ETA, while a log file (CI, a Prefect worker, ``| tee``) wants a
line every so often and no carriage-return noise. One small API serves both::

    with progress(total=len(batches_rows), desc="rate", unit="ex") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

``GLEANER_PROGRESS`` forces a mode: ``bar``, ``plain`` or ``off``.
Listeners (``on_update``) see ``(done, total)`` at most every ``interval_s``
and once at the end: a Prefect progress artifact hangs off that hook.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

Mode = Literal["auto", "bar", "plain", "off"]
Listener = Callable[[int, "int | None"], None]
MODES = ("auto", "bar", "plain", "off")


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m': short enough for a log line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def resolve_mode(mode: Mode, stream: TextIO) -> Literal["bar", "plain", "off"]:
    forced = os.environ.get("GLEANER_PROGRESS", "").strip().lower()
    if mode == "auto" and forced:
        if forced not in MODES:
            raise ValueError(f"GLEANER_PROGRESS must be one of {', '.join(MODES)}, not {forced!r}")
        mode = forced  # type: ignore[assignment]
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


class Progress:
    """Counts work done; renders it as a tqdm bar or as plain lines, and tells listeners."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "ex",
        *,
        mode: Mode = "auto",
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        on_update: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial: int = 0,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.interval_s = interval_s
        self.listeners: list[Listener] = [on_update] if on_update else []
        self.clock = clock
        # work finished before this process (a resumed run): counted, but not in the rate
        self.initial = initial
        self.done = initial
        self.started = clock()
        self._last_report = self.started
        self._reported: int | None = None  # `done` at the last report
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=desc or None, unit=unit, file=self.stream,
                dynamic_ncols=True, smoothing=0.1, initial=initial,
            )

    # ---- figures -----------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started

    @property
    def rate(self) -> float:
        """Units per second so far (0 before any time has passed)."""
        elapsed = self.elapsed_s
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def line(self) -> str:
        """'rate: 1200/52002 ex (2.3%), 41.0 ex/s, elapsed 29s, ETA 20m39s'."""
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            share = 100.0 * self.done / self.total
            count = f"{self.done}/{self.total} {self.unit} ({share:.1f}%)"
        else:
            count = f"{self.done} {self.unit}"
        parts = [
            count,
            f"{self.rate:.1f} {self.unit}/s",
            f"elapsed {format_duration(self.elapsed_s)}",
        ]
        if self.eta_s is not None and self.done < (self.total or 0):
            parts.append(f"ETA {format_duration(self.eta_s)}")
        return head + ", ".join(parts)

    # ---- updates -----------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def update(self, n: int = 1) -> None:
        if self._closed:
            raise RuntimeError("update() after the progress was closed")
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = self.clock()
        if now - self._last_report >= self.interval_s:
            self._last_report = now
            self._report()

    def _report(self) -> None:
        self._reported = self.done
        if self.mode == "plain":
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        for listener in self.listeners:
            listener(self.done, self.total)

    def close(self) -> None:
        """Final line / listener call, and the bar closed. Safe to call twice."""
        if self._closed:
            return
        if self._reported != self.done:  # the final figures, unless just reported
            self._report()
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str = "", unit: str = "ex", **kwargs: object) -> Progress:
    """The usual way in: ``with progress(total, "rate") as bar: bar.update(n)``."""
    return Progress(total, desc, unit, **kwargs)  # type: ignore[arg-type]


def prefect_progress_listener(key: str, description: str | None = None) -> Listener:
    """A listener that keeps one Prefect progress artifact (0-100 %) up to date.

    Call inside a flow or task run; the artifact appears on that run's page in
    the UI and moves while the stage runs.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, object] = {}

    def listener(done: int, total: int | None) -> None:
        share = 100.0 * done / total if total else 0.0
        share = min(100.0, share)
        if "id" not in state:
            state["id"] = create_progress_artifact(
                progress=share, key=key, description=description
            )
        else:
            update_progress_artifact(artifact_id=state["id"], progress=share)  # type: ignore[arg-type]

    return listener
