"""The execution environment: one Prefect API for the flow and all its Ray workers, and Ray.

Without ``PREFECT_API_URL`` every Ray worker would start its own throw-away
Prefect API and the UI would show nothing of the batches. So gleaner either
uses the API the user configured, or starts (once, and reuses) a
``prefect server start`` on loopback, and hands its URL to every Ray worker
through the runtime environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from gleaner.config import GleanerConfig

log = logging.getLogger("gleaner.runtime")
STATE_DIR = Path(os.environ.get("GLEANER_HOME", Path.home() / ".gleaner"))
SERVER_STATE = "prefect-server.json"

# Environment every Ray worker needs (never secrets: those reach workers through
# the node's own environment or Prefect Secret blocks).
WORKER_ENV_KEYS = (
    "PREFECT_API_URL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_LOGGING_LEVEL",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TQDM_DISABLE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def start_prefect_server(
    port: int | None = None,
    home: Path | None = None,
    log_path: Path | None = None,
    timeout_s: float = 120.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``prefect server start`` on loopback and wait until its API answers."""
    port = port or free_port()
    env = dict(os.environ)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_UI_ENABLED"] = env.get("PREFECT_UI_ENABLED", "true")
    # The UI asks the browser to call PREFECT_UI_API_URL, which otherwise means port 4200.
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    log_path = log_path or STATE_DIR / f"prefect-server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 (the server owns it for its lifetime)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}; see {log_path}")
        if api_is_healthy(api_url):
            return process, api_url
        time.sleep(0.5)
    process.terminate()
    raise TimeoutError(f"prefect server did not answer within {timeout_s:.0f}s; see {log_path}")


def local_prefect_api() -> str:
    """Reuse the local server gleaner started earlier, or start one that outlives this process."""
    state_file = STATE_DIR / SERVER_STATE
    if state_file.exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            url = json.loads(state_file.read_text())["api_url"]
            if api_is_healthy(url):
                return url
    process, url = start_prefect_server()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"api_url": url, "pid": process.pid}))
    return url


def resolve_prefect_api(config: GleanerConfig) -> str:
    """The API every part of this run reports to: config, then env, then a local server."""
    url = config.prefect.api_url or os.environ.get("PREFECT_API_URL")
    if url:
        return url
    return local_prefect_api()


@contextlib.contextmanager
def prefect_api(api_url: str) -> Iterator[str]:
    """Point this process (and, through the env, its children) at one Prefect API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            from gleaner.flow_runs import ensure_zombie_automation

            ensure_zombie_automation()  # dead flow runs end Crashed, not Running forever
            yield api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


# Ray Train's placement-group cleaner asks the state API whether the training controller
# lives, every second of a fit. A local Ray runs without the dashboard that serves that API,
# so every ask logs this same warning (74 lines in one demo run); on a cluster with a
# dashboard the ask succeeds and nothing is dropped.
RAY_NOISE = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_internals() -> None:
    """Runs in every Ray worker process (``worker_process_setup_hook``): drops the repeated
    lines of :data:`RAY_NOISE` there, where they are logged, so no console shows them."""
    for logger, prefix in RAY_NOISE.items():
        logging.getLogger(logger).addFilter(_DropMessage(prefix))


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}


def check_gpus(config: GleanerConfig, needed: float, setting: str) -> None:
    """Refuse, naming the setting, a stage or training run that asks for more GPUs than the
    Ray cluster has, before any work (an autoscaling cluster is trusted to add them)."""
    import ray

    if needed <= 0 or not ray.is_initialized() or config.ray.autoscaling:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have < needed:
        where = config.ray.address or os.environ.get("RAY_ADDRESS") or "the local Ray"
        raise ValueError(
            f"{setting} asks for {needed:g} GPU(s), but {where} has {have:g}: lower it, point "
            "ray.address at a cluster with GPUs, or set ray.autoscaling: true if the cluster "
            "adds GPU nodes on demand")


def init_ray(config: GleanerConfig) -> None:
    """Connect to the configured cluster, or start a local Ray, passing the Prefect API along."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, object] = {
        "runtime_env": {"env_vars": worker_env(),
                        "worker_process_setup_hook": "gleaner.runtime.quiet_ray_internals"},
        "namespace": "gleaner",
        "log_to_driver": True,
        "ignore_reinit_error": True,
    }
    if address:
        ray.init(address=address, **kwargs)
        return
    # A local Ray is a development cluster: Ray 2.60's token auth only gets in the way.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if config.ray.num_cpus:
        kwargs["num_cpus"] = config.ray.num_cpus
    # address="local": always a fresh local Ray, never some other process's cluster that
    # Ray would otherwise auto-join through /tmp/ray/ray_current_cluster.
    # Ray's own helpers inside the cluster (Ray Train's placement-group cleaner, the state
    # API) find "the" cluster by auto-detection, which fails as soon as a second Ray runs on
    # the machine. So the GCS port is chosen here and every worker is told the address.
    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"] = address  # type: ignore[index]
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts the head
    try:
        ray.init(address="local", include_dashboard=False, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    actual = ray.get_runtime_context().gcs_address
    if actual != address:
        log.warning("local Ray's GCS is at %s, not %s: Ray's helpers may miss it", actual, address)


@contextlib.contextmanager
def execution_environment(config: GleanerConfig) -> Iterator[str]:
    """Prefect API + Ray for the duration of a flow run. Yields the API URL."""
    api_url = resolve_prefect_api(config)
    with prefect_api(api_url):
        init_ray(config)
        yield api_url
