"""Shared fixtures: the real parts the tests start themselves.

- ``prefect_api``: one ``prefect server start`` on a free loopback port per session;
- ``ray_local``: a local Ray whose workers report to that same Prefect API;
- ``s3``: moto's S3 server (real HTTP) on loopback, with a fresh bucket per test;
- ``shared_data``: ../shared/data (read-only real data).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="gleaner-tests-"))
os.environ.setdefault("GLEANER_HOME", str(_SESSION_HOME / "gleaner-home"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect-home"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s (Ray's default), so every fit waits up to
# two polls after its workers finish; a tenth of that costs nothing on loopback. Set before
# any Ray starts: local workers inherit it (and Ray Train propagates it to its controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# moto's dummy credentials, set before any Ray worker starts: local Ray workers inherit the
# environment of ray.init, and workers that write checkpoints to the test S3 need them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data missing: {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API server on loopback, shared by the whole test session."""
    from gleaner.runtime import prefect_api as use_api
    from gleaner.runtime import start_prefect_server

    process, url = start_prefect_server(
        home=_SESSION_HOME / "prefect-server-home",
        log_path=_SESSION_HOME / "prefect-server.log",
    )
    try:
        with use_api(url):
            yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except Exception:
            process.kill()


@pytest.fixture(scope="session")
def ray_local(prefect_api: str) -> Iterator[None]:
    """A local Ray (2 CPUs) whose workers report to the session's Prefect API."""
    import ray

    from gleaner.config import GleanerConfig
    from gleaner.runtime import init_ray

    config = GleanerConfig()
    config.ray.num_cpus = 2
    init_ray(config)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server speaking real HTTP on loopback (what s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    from tests.support.openai_server import free_port

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: str) -> dict[str, str]:
    """A fresh bucket: returns the store URL and the storage options to reach it."""
    import s3fs

    bucket = f"gleaner-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    return {"url": f"s3://{bucket}/store", "endpoint_url": moto_server, "bucket": bucket}
