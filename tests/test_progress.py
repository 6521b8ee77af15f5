"""CLI progress: a bar in a terminal (checked in a real pseudo-terminal), plain lines elsewhere."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from gleaner.progress import Progress, format_duration, progress


class FakeClock:
    """A controllable clock so rate/ETA figures are exact (time itself is not under test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_when_not_a_tty_with_rate_and_eta():
    stream = io.StringIO()  # not a TTY
    clock = FakeClock()
    with progress(total=1000, desc="rate", stream=stream, interval_s=5, clock=clock) as bar:
        assert bar.mode == "plain"
        clock.now += 2
        bar.update(100)  # under the interval: quiet
        assert stream.getvalue() == ""
        clock.now += 8
        bar.update(100)  # 200 done in 10 s: 20/s, 800 left: 40 s
        clock.now += 5
        bar.update(800)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "rate: 200/1000 ex (20.0%), 20.0 ex/s, elapsed 10s, ETA 40s"
    assert lines[-1].startswith("rate: 1000/1000 ex (100.0%)")
    assert "ETA" not in lines[-1]
    assert "\r" not in stream.getvalue()  # no bar noise in logs
    assert len(lines) == 2  # the final figures were just reported: no duplicate at close


def test_unknown_total_and_listener_calls():
    calls = []
    clock = FakeClock()
    bar = Progress(None, "embed", unit="batch", stream=io.StringIO(), interval_s=1,
                   on_update=lambda done, total: calls.append((done, total)), clock=clock)
    bar.update(3)
    clock.now += 1
    bar.update(2)
    bar.close()
    bar.close()  # idempotent
    assert calls == [(5, None)]
    quick = Progress(4, stream=io.StringIO(), interval_s=60,
                     on_update=lambda done, total: calls.append((done, total)))
    quick.update(4)
    quick.close()  # finished before the first interval: still reported once
    assert calls[-1] == (4, 4)
    assert bar.line().startswith("embed: 5 batch, ")
    with pytest.raises(RuntimeError):
        bar.update(1)


def test_resumed_work_counts_but_does_not_inflate_the_rate():
    stream = io.StringIO()
    clock = FakeClock()
    bar = progress(100, "rate", unit="batch", stream=stream, interval_s=1, clock=clock,
                   initial=60)
    clock.now += 10
    bar.update(10)  # 10 batches in 10 s; 30 left
    bar.close()
    assert stream.getvalue().splitlines()[0] == (
        "rate: 70/100 batch (70.0%), 1.0 batch/s, elapsed 10s, ETA 30s"
    )


def test_env_forces_mode(monkeypatch):
    monkeypatch.setenv("GLEANER_PROGRESS", "off")
    stream = io.StringIO()
    with progress(10, "x", stream=stream, interval_s=0) as bar:
        bar.update(10)
    assert bar.mode == "off" and stream.getvalue() == ""
    monkeypatch.setenv("GLEANER_PROGRESS", "sparkles")
    with pytest.raises(ValueError, match="GLEANER_PROGRESS"):
        progress(10, stream=stream)


def test_format_duration():
    assert format_duration(42) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7620) == "2h07m"
    assert format_duration(float("inf")) == "?"


def test_bar_in_a_real_terminal():
    """Run a stage under a pseudo-terminal, as a person at a shell would: tqdm draws the bar."""
    script = textwrap.dedent(
        """
        import sys
        from gleaner.progress import progress
        with progress(total=50, desc="rate", unit="ex") as bar:
            print("mode=" + bar.mode, file=sys.stderr)
            for _ in range(5):
                bar.update(10)
        """
    )
    main, child = pty.openpty()
    # a new pseudo-terminal is 0x0; give it the size of a normal terminal window
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("GLEANER_PROGRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=child, stdout=child, stderr=child, env=env,
        close_fds=True,
    )
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert process.wait(timeout=30) == 0
    text = output.decode("utf-8", "replace")
    assert "mode=bar" in text
    assert "50/50" in text and "rate:" in text
    assert "\r" in text  # the bar redraws in place



def test_prefect_progress_artifact_follows_the_stage(prefect_api):
    """The listener keeps one progress artifact of the flow run up to date (what the UI shows)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from gleaner.progress import prefect_progress_listener

    clock = FakeClock()
    seen: list[int] = []

    @flow(name="progress-probe")
    def probe() -> None:
        listener = prefect_progress_listener("probe-progress", "rating batches")

        def both(done: int, total: int | None) -> None:
            listener(done, total)
            seen.append(done)

        with progress(4, "rate", unit="batch", stream=io.StringIO(), interval_s=1, clock=clock,
                      on_update=both) as bar:
            for _ in range(4):
                clock.now += 1
                bar.update(1)

    probe()
    assert seen == [1, 2, 3, 4]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["probe-progress"])))
    assert artifact.type == "progress" and float(artifact.data) == 100.0
    assert artifact.description == "rating batches"
