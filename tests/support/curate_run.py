"""One `gleaner curate` run through the CLI, shared by the tests that inspect its traces.

The browser test and the secret-leak test both look at a finished run: one
through the Prefect UI, one by grepping everything the run left behind. The run
is the user's path: the `gleaner` command in a subprocess, a distinctive API key
in its environment, every LLM call to a loopback server that also injects a
500 and a 400 whose messages echo the key (as careless servers do). It runs
once per test session, on the first request.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.openai_server import OpenAIStub, Reply, request_text
from tests.support.pipeline import (
    ROOT,
    pipeline_responder,
    prefect_env,
    write_config,
    write_sample,
)

KEY_ENV = "GLEANER_CANARY_API_KEY"
SAMPLE_ROWS = 20


@dataclass
class CliRun:
    run_id: str
    api_url: str
    key: str
    workdir: Path
    store: Path
    summary: dict[str, Any]
    stdout: str
    stderr: str
    authorizations: set[str | None] = field(default_factory=set)
    injected: dict[str, int] = field(default_factory=dict)
    requests: int = 0


class LeakyServerResponder:
    """pipeline_responder, plus one 500 and one permanent 400 whose messages echo the key.

    (Not a 401: a rejected key stops the whole stage, by design; a 400 fails one example.)"""

    def __init__(self, key: str):
        self.key = key
        self.lock = threading.Lock()
        self.injected = {"500": 0, "400": 0}
        self.first_prompt: str | None = None
        self.second_prompt: str | None = None

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        if "messages" in body:
            text = request_text(body)
            with self.lock:
                if self.first_prompt is None:
                    self.first_prompt = text
                elif self.second_prompt is None and text != self.first_prompt:
                    self.second_prompt = text
                if text == self.first_prompt and self.injected["500"] == 0:
                    self.injected["500"] += 1  # transient: the client retries and succeeds
                    return Reply(status=500, error_message=f"upstream failed for key {self.key}")
                if text == self.second_prompt:
                    self.injected["400"] += 1  # permanent: this example's rating fails
                    return Reply(status=400,
                                 error_message=f"Invalid request from key {self.key}")
        return pipeline_responder(body)


_RUNS: dict[str, CliRun] = {}
_LOCK = threading.Lock()


def gleaner_command() -> list[str]:
    script = Path(sys.executable).parent / "gleaner"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gleaner.flows.cli import main; main()"]


def cli_curate_run(api_url: str) -> CliRun:
    """The session's CLI curate run against ``api_url`` (started on first use)."""
    with _LOCK:
        if api_url not in _RUNS:
            _RUNS[api_url] = _run(api_url)
        return _RUNS[api_url]


def _run(api_url: str) -> CliRun:
    workdir = Path(tempfile.mkdtemp(prefix="gleaner-cli-run-"))
    atexit.register(shutil.rmtree, workdir, True)
    key = "sk-gleaner-canary-" + secrets.token_hex(12)
    run_id = "cli-" + secrets.token_hex(4)
    store = workdir / "store"
    sample = write_sample(workdir / "alpaca_sample.json", SAMPLE_ROWS)
    responder = LeakyServerResponder(key)
    with OpenAIStub(responder) as llm:
        config = write_config(workdir / "gleaner.yaml", str(store), llm.base_url,
                              api_key_env=KEY_ENV, budget=5)
        env = prefect_env(api_url, **{KEY_ENV: key, "PREFECT_LOGGING_LEVEL": "INFO",
                                      "GLEANER_HOME": str(workdir / "gleaner-home")})
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run(
            [*gleaner_command(), "curate", str(sample), "--config", str(config),
             "--run-id", run_id, "--no-train", "--no-eval", "--json"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"gleaner curate failed ({result.returncode}):\n{result.stderr[-6000:]}"
            )
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        return CliRun(
            run_id=run_id, api_url=api_url, key=key, workdir=workdir, store=store,
            summary=summary, stdout=result.stdout, stderr=result.stderr,
            authorizations={h.get("authorization") for h in llm.request_headers},
            injected=dict(responder.injected), requests=len(llm.requests),
        )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


__all__ = ["CliRun", "cli_curate_run", "in_ci", "ROOT"]
