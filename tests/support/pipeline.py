"""What the operating tests share: a loopback LLM for every stage, a demo-size config,
Prefect workers and deployments started as real processes, and run-tree queries.

The LLM server is the real HTTP :class:`OpenAIStub`: chat requests (AlpaGasus
rating) get a first-line score and an explanation; completion requests with
logprobs (DEITA's endpoint scorer) get top_logprobs over "1".."6". Scores are
a stable function of the prompt, so reruns answer the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from tests.support.openai_server import Reply, request_text

ROOT = Path(__file__).resolve().parents[2]
ALPACA_SAMPLE = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def pipeline_responder(body: dict[str, Any]) -> Reply | str:
    """A rater for chat requests and a DEITA scorer for completions, deterministic per prompt."""
    text = request_text(body)
    if "messages" in body:
        score = _digest(text) % 11 / 2  # 0.0 .. 5.0
        return f"{score}\nThe response addresses the instruction; score {score}."
    best = 1 + _digest(text) % 6
    top = {str(k): math.log(0.9 if k == best else 0.02) for k in range(1, 7)}
    return Reply(content=str(best), top_logprobs=[dict(sorted(top.items(), key=lambda kv: -kv[1]))])


def write_sample(path: Path, rows: int, start: int = 0) -> Path:
    """The first ``rows`` records of the real Alpaca sample, as an Alpaca JSON file."""
    records = json.loads(ALPACA_SAMPLE.read_text(encoding="utf-8"))[start:start + rows]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_config(
    path: Path, store: str, llm_url: str, api_key_env: str = "OPENAI_API_KEY",
    budget: int = 6, dataset_name: str = "curated",
) -> Path:
    """A demo-size config: every LLM call to the loopback server, real MiniLM embeddings."""
    endpoint = {"base_url": llm_url, "model": "stub-model", "api_key_env": api_key_env,
                "max_retries": 3, "timeout_s": 30}
    config = {
        "store": {"url": store},
        "rate": {"endpoint": endpoint,
                 "resources": {"batch_size": 8, "concurrency": 4, "retry_delay_s": 0}},
        "score": {"backend": "endpoint", "endpoint": endpoint,
                  "resources": {"batch_size": 16, "concurrency": 4}},
        "embed": {"resources": {"batch_size": 64}},
        "select": {"selector": "deita", "budget": budget, "tau": 0.9},
        "curate": {"dataset_name": dataset_name, "train": False, "evaluate": False,
                   "downstream": "event"},
        "ray": {"num_cpus": 2},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def prefect_env(api_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GLEANER_CHECKOUT": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def prefect_cli(*args: str, env: dict[str, str], timeout_s: float = 300
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
    )


class Worker:
    """``prefect worker start`` as its own process group; its log is kept for inspection."""

    def __init__(self, pool: str, env: dict[str, str], log_path: Path, limit: int | None = 1):
        self.pool, self.env, self.log_path, self.limit = pool, env, log_path, limit
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "wb")  # noqa: SIM115 (the worker owns it)
        limit = ["--limit", str(self.limit)] if self.limit is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool,
             "--type", "process", *limit],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the Prefect API, as the UI sees a run -------------------------------------------


def wait_for_flow_run(client: Any, flow_run_id: UUID, timeout_s: float, worker: Worker | None = None
                      ) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.type.value in TERMINAL:
            return run
        if worker is not None and worker.process is not None and worker.process.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.log()[-4000:]}")
        if time.monotonic() > deadline:
            state = run.state.type.value if run.state else None
            tail = worker.log()[-4000:] if worker else ""
            raise AssertionError(f"flow run still {state} after {timeout_s:.0f}s\n{tail}")
        time.sleep(1.0)


def run_tree(client: Any, flow_run_id: UUID) -> list[Any]:
    """A flow run and all its subflow runs (the stages of curate), depth first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, todo = [], [flow_run_id]
    while todo:
        current = todo.pop()
        found.append(client.read_flow_run(current))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current])))
        todo.extend(child.id for child in children)
    return found


def _ids_filter(flow_runs: list[Any]) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in flow_runs]))


def task_runs_of(client: Any, flow_runs: list[Any]) -> list[Any]:
    return client.read_task_runs(flow_run_filter=_ids_filter(flow_runs), limit=200)


def artifacts_of(client: Any, flow_runs: list[Any]) -> list[Any]:
    return client.read_artifacts(flow_run_filter=_ids_filter(flow_runs), limit=200)


def logs_of(client: Any, flow_runs: list[Any]) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages: list[str] = []
    for run in flow_runs:
        offset = 0
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                limit=200, offset=offset)
            messages += [log.message for log in page]
            if len(page) < 200:
                break
            offset += 200
    return messages


def events_text(api_url: str, since_s: float = 3600) -> str:
    """Every event the server recorded in the last hour, as JSON text (payloads included)."""
    import datetime as dt

    import httpx

    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=since_s)).isoformat()
    body = {"filter": {"occurred": {"since": since}}, "limit": 50}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    page = response.json()
    chunks = [json.dumps(page["events"])]
    while page.get("next_page"):
        page = httpx.get(page["next_page"], timeout=30).json()
        chunks.append(json.dumps(page["events"]))
    return "\n".join(chunks)


def flow_run_by_name(client: Any, name: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        name=FlowRunFilterName(any_=[name])))
    if len(runs) != 1:
        raise AssertionError(f"expected one flow run named {name!r}, found {len(runs)}")
    return runs[0]


# ---- secret leaks ----------------------------------------------------------------------


def store_texts(root: Path) -> dict[str, str]:
    """Every file under a local store as text; Parquet decoded (its pages are compressed)."""
    import pyarrow.parquet as pq

    texts = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            texts[str(path)] = json.dumps(table.to_pylist(), default=str) + str(table.schema)
        else:
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


def leaks(secret: str, texts: dict[str, str]) -> list[str]:
    """Names of the texts that hold the secret (whole, or its distinctive tail)."""
    tail = secret[-12:]
    return [name for name, text in texts.items() if secret in text or tail in text]


def prefect_record_texts(client: Any, api_url: str, flow_runs: list[Any]) -> dict[str, str]:
    """What Prefect keeps about a run: flow runs, task runs, logs, artifacts, events."""
    texts = {f"flow run {r.name}": r.model_dump_json() for r in flow_runs}
    for task_run in task_runs_of(client, flow_runs):
        texts[f"task run {task_run.name}"] = task_run.model_dump_json()
    texts["logs"] = "\n".join(logs_of(client, flow_runs))
    texts.update({f"artifact {a.key or a.id}": a.model_dump_json()
                  for a in artifacts_of(client, flow_runs)})
    texts["events"] = events_text(api_url)
    return texts
