"""Stages on a two-node Ray cluster on loopback, in a process of its own.

Ray can be initialised once per process and the test session already has its
local Ray, so each cluster run is a child process: ``python -m
tests.support.cluster_run SPEC.json OUT.json``. It starts a
``ray.cluster_utils.Cluster`` (a head and one worker node, ``num_cpus`` each),
connects to it, runs the scenarios the spec names through the real flows
(``run_rate``, ``run_embed``: gleaner's ``init_ray`` sees Ray already up and
returns), writes one JSON result and shuts the cluster down.

Scenarios:

- ``refuse``: rating with a local-folder store; the error, and how many requests the
  loopback LLM got;
- ``rate``: rating on the ``s3://`` store, the LLM a :class:`FaultyRater` in this process;
- ``embed``: embeddings on the ``s3://`` store, one actor per node.

While a flow runs, :class:`DriverSpy` watches this process (the driver): every
Parquet read through the store and pyarrow (which columns of which files),
every ``read_segments`` call, what is pickled to the workers (the job and the
batch specs) and what comes back from each batch. The test decides what is
allowed; this script only reports.

The parent (:func:`run_cluster`) starts the child in a session of its own and,
whatever happens, kills every process left in that session (Ray's raylets, GCS
and workers all stay in it), then removes the Ray temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


# ---- the parent side -------------------------------------------------------------------------
@dataclass
class ClusterRun:
    result: dict[str, Any]
    log: str
    seconds: float


def _session_processes(sid: int) -> list[Any]:
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid != os.getpid() and os.getsid(process.pid) == sid:
                found.append(process)
    return found


def _kill_session(sid: int) -> list[int]:
    """Kill every process of session ``sid`` (only the child started it); returns their pids."""
    import psutil

    leftover = _session_processes(sid)
    for process in leftover:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(leftover, timeout=10)
    return [p.pid for p in leftover]


def run_cluster(spec: dict[str, Any], env: dict[str, str], workdir: Path,
                timeout_s: float = 300.0) -> ClusterRun:
    """Run the child with ``spec``; its JSON result and the tail of its log."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / "spec.json", workdir / "result.json",
                                     workdir / "child.log")
    spec_path.write_text(json.dumps(spec))
    # A short private Ray temp dir: its sockets stay under the path limit, and the
    # cluster's address file never lands in /tmp/ray, where another ray.init() would find it.
    ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    child_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    child_env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    child_env.setdefault("RAY_AUTH_MODE", "disabled")
    child_env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cluster_run", str(spec_path), str(out_path)],
            cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            leftover = _kill_session(process.pid)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    if not out_path.exists():
        raise AssertionError(f"the cluster run wrote no result (exit {process.returncode}, "
                             f"{seconds:.0f}s of {timeout_s:.0f}s):\n{text[-8000:]}")
    result = json.loads(out_path.read_text())
    result["exit_code"], result["leftover_pids"] = process.returncode, leftover
    return ClusterRun(result, text, seconds)


# ---- the driver's watch ----------------------------------------------------------------------
def found_texts(blob: bytes, needles: list[str]) -> list[str]:
    return [n for n in needles if n.encode("utf-8") in blob]


class _SpyDataset:
    """A pyarrow dataset that tells the spy what is read of it."""

    def __init__(self, real: Any, paths: list[str], record: Callable[..., None]):
        self._real, self._paths, self._record = real, paths, record

    def _read(self, how: str, columns: Any) -> None:
        self._record("dataset", how=how, paths=self._paths,
                     columns=None if columns is None else list(columns))

    def to_table(self, columns: Any = None, **kwargs: Any) -> Any:
        self._read("to_table", columns)
        return self._real.to_table(columns=columns, **kwargs)

    def to_batches(self, columns: Any = None, **kwargs: Any) -> Any:
        self._read("to_batches", columns)
        return self._real.to_batches(columns=columns, **kwargs)

    def scanner(self, columns: Any = None, **kwargs: Any) -> Any:
        self._read("scanner", columns)
        return self._real.scanner(columns=columns, **kwargs)

    def head(self, num_rows: int, columns: Any = None, **kwargs: Any) -> Any:
        self._read("head", columns)
        return self._real.head(num_rows, columns=columns, **kwargs)

    def take(self, indices: Any, columns: Any = None, **kwargs: Any) -> Any:
        self._read("take", columns)
        return self._real.take(indices, columns=columns, **kwargs)

    def count_rows(self, **kwargs: Any) -> int:
        return self._real.count_rows(**kwargs)  # metadata, no rows

    def __getattr__(self, name: str) -> Any:
        self._record("dataset", how=f"attribute {name}", paths=self._paths, columns=None)
        return getattr(self._real, name)


class DriverSpy:
    """Records, in this process only, what the driver reads and what it ships and receives."""

    def __init__(self, needles: list[str]):
        self.needles = needles
        self.events: list[dict[str, Any]] = []
        self.shipped: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.pid = os.getpid()

    def record(self, kind: str, **fields: Any) -> None:
        if os.getpid() == self.pid:  # never a worker's (they have their own modules anyway)
            self.events.append({"kind": kind, **fields})

    def report(self) -> dict[str, Any]:
        return {"events": self.events, "shipped": self.shipped, "results": self.results}

    @contextlib.contextmanager
    def watching(self) -> Iterator[DriverSpy]:
        import pyarrow.parquet as pq
        import pyarrow.parquet.core as pq_core
        from ray import cloudpickle

        import gleaner.engine.batches as batches
        import gleaner.engine.runner as runner
        import gleaner.engine.worker as worker
        from gleaner.store import Store

        spy = self
        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
            original = getattr(owner, name)
            patches.append((owner, name, original))
            setattr(owner, name, make(original))

        def dataset(original: Any) -> Any:
            def spied(store: Any, paths: Any, schema: Any = None) -> Any:
                paths = list(paths)
                return _SpyDataset(original(store, paths, schema=schema), paths, spy.record)
            return spied

        def parquet_read(label: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                def spied(*args: Any, **kwargs: Any) -> Any:
                    spy.record("parquet", how=label, columns=kwargs.get("columns"))
                    return original(*args, **kwargs)
                return spied
            return make

        def segments(original: Any) -> Any:
            def spied(store: Any, segs: Any, columns: Any) -> Any:
                spy.record("read_segments", segments=len(segs), columns=list(columns))
                return original(store, segs, columns)
            return spied

        def execute(original: Any) -> Any:
            def spied(job: Any, specs: Any, on_done: Any) -> Any:
                payload = cloudpickle.dumps((job, specs))
                spy.shipped.append({
                    "runner": original.__name__, "bytes": len(payload), "batches": len(specs),
                    "segments": [[s.path, s.start, s.stop] for spec in specs
                                 for s in spec.segments],
                    "texts_found": found_texts(payload, spy.needles)})

                def done(spec: Any, result: Any, error: BaseException | None) -> None:
                    blob = cloudpickle.dumps(result)
                    spy.results.append({
                        "index": spec.index, "result": result,
                        "error": None if error is None else f"{type(error).__name__}: {error}",
                        "bytes": len(blob), "texts_found": found_texts(blob, spy.needles)})
                    on_done(spec, result, error)

                return original(job, specs, done)
            return spied

        patch(Store, "dataset", dataset)
        patch(pq, "read_table", parquet_read("pq.read_table"))
        patch(pq_core, "read_table", parquet_read("pq.read_table"))
        for method in ("read", "read_row_group", "read_row_groups", "iter_batches"):
            patch(pq_core.ParquetFile, method, parquet_read(f"ParquetFile.{method}"))
        patch(batches, "read_segments", segments)
        patch(worker, "read_segments", segments)
        patch(runner, "run_tasks", execute)
        patch(runner, "run_actors", execute)
        try:
            yield self
        finally:
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)


# ---- the child -------------------------------------------------------------------------------
def _error(error: BaseException) -> dict[str, Any]:
    return {"error_type": type(error).__name__, "error": str(error),
            "traceback": "".join(traceback.format_exception(error))[-6000:]}


def _rate_config(store: dict[str, Any], llm_url: str, overrides: dict[str, Any]) -> Any:
    from gleaner.config import GleanerConfig

    values = {
        "store.url": store["url"], "store.options": store.get("options") or {},
        "rate.endpoint.base_url": llm_url, "rate.endpoint.model": "stub-model",
        "rate.endpoint.timeout_s": 5.0, "rate.endpoint.max_retries": 2,
        "rate.mode": "explain", "rate.resources.retry_delay_s": 0,
    }
    return GleanerConfig().with_overrides({**values, **overrides})


def scenario_rate(spec: dict[str, Any], store: dict[str, Any], run_id: str, watch: bool
                  ) -> dict[str, Any]:
    from gleaner.flows.rate_flow import run_rate
    from tests.support.faults import FaultyRater
    from tests.support.openai_server import OpenAIStub

    rater = FaultyRater(delay_s=spec.get("llm_delay_s", 0.0))
    out: dict[str, Any] = {}
    spy = DriverSpy(spec["needles"])
    with OpenAIStub(rater) as stub:
        config = _rate_config(store, stub.base_url, spec.get("rate", {}))
        started = time.perf_counter()
        try:
            with spy.watching() if watch else contextlib.nullcontext():
                out["summary"] = run_rate(config, run_id)
        except Exception as error:
            out.update(_error(error))
        out["seconds"] = round(time.perf_counter() - started, 2)
        out["requests"] = stub.count()
        out["requests_by_key"] = dict(rater.snapshot())
    if watch:
        out["spy"] = spy.report()
    return out


def scenario_embed(spec: dict[str, Any], store: dict[str, Any]) -> dict[str, Any]:
    from gleaner.config import GleanerConfig
    from gleaner.flows.deita_flow import run_embed
    from gleaner.store import Store

    config = GleanerConfig().with_overrides({
        "store.url": store["url"], "store.options": store.get("options") or {},
        **spec.get("embed", {})})
    out: dict[str, Any] = {}
    spy = DriverSpy(spec["needles"])
    started = time.perf_counter()
    try:
        with spy.watching():
            out["summary"] = run_embed(Store(config.store.url, config.store.options),
                                       spec["run_id"], config)
    except Exception as error:
        out.update(_error(error))
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["spy"] = spy.report()
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    result: dict[str, Any] = {"scenarios": {}}

    def save() -> None:
        out_path.write_text(json.dumps(result, default=str))

    import ray
    from ray.cluster_utils import Cluster

    from gleaner.runtime import free_port, prefect_api, worker_env

    started = time.perf_counter()
    cluster = None
    try:
        cpus = spec.get("cpus_per_node", 1)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus, "include_dashboard": False,
            "dashboard_agent_listen_port": free_port()})
        for _ in range(spec.get("nodes", 2) - 1):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        with prefect_api(spec["prefect_api"]):  # before worker_env(): it hands the URL on
            env_vars = worker_env() | {k: os.environ[k] for k in AWS_KEYS if k in os.environ}
            ray.init(address=cluster.address, namespace="gleaner",
                     runtime_env={"env_vars": env_vars})
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            result["cluster"] = {
                "address": cluster.address, "seconds_to_start": round(
                    time.perf_counter() - started, 2),
                "nodes": [n["NodeID"] for n in nodes],
                "node_addresses": [n.get("NodeManagerAddress") for n in nodes],
                "cpus": ray.cluster_resources().get("CPU"),
                "worker_env_keys": sorted(env_vars)}
            save()
            for name in spec["scenarios"]:
                if name == "refuse":
                    outcome = scenario_rate(spec, spec["local_store"], spec["refuse_run_id"],
                                            watch=False)
                elif name == "rate":
                    outcome = scenario_rate(spec, spec["s3_store"], spec["run_id"], watch=True)
                elif name == "embed":
                    outcome = scenario_embed(spec, spec["s3_store"])
                else:
                    outcome = {"error_type": "KeyError", "error": f"unknown scenario {name}"}
                result["scenarios"][name] = outcome
                save()
    except BaseException as error:
        result["error"] = _error(error)
        raise
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        result["seconds"] = round(time.perf_counter() - started, 2)
        save()


if __name__ == "__main__":
    main()
