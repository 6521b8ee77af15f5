"""The execution environment: Ray workers find their own cluster and their Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HOLD_A_RAY = textwrap.dedent(
    """
    import sys
    from gleaner.config import GleanerConfig
    from gleaner.runtime import init_ray
    import ray
    init_ray(GleanerConfig())
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # hold the cluster until the test closes stdin
    ray.shutdown()
    """
)

PROBE = textwrap.dedent(
    """
    import json
    from gleaner.config import GleanerConfig
    from gleaner.runtime import init_ray
    import ray
    init_ray(GleanerConfig())

    @ray.remote
    def inside():
        import os
        from ray._private.services import canonicalize_bootstrap_address_or_die
        # what Ray's own helpers (Ray Train's placement-group cleaner) resolve
        return canonicalize_bootstrap_address_or_die(None), os.environ.get("PREFECT_API_URL")

    resolved, api = ray.get(inside.remote())
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "resolved": resolved,
                      "api": api}))
    ray.shutdown()
    """
)


def test_workers_resolve_their_own_cluster_when_another_ray_runs_here() -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PREFECT_API_URL="http://127.0.0.1:9/api")
    env.pop("RAY_ADDRESS", None)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        other_gcs = other.stdout.readline().strip()
        assert other_gcs, "the other Ray did not start"
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert seen["gcs"] != other_gcs
    assert seen["resolved"] == seen["gcs"]  # not "multiple active Ray instances"
    assert seen["api"] == "http://127.0.0.1:9/api"  # the flow's Prefect API reaches workers
