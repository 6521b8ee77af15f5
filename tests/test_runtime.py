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


CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
FIT_A_WHILE = textwrap.dedent(
    f"""
    import logging, time
    import ray, ray.train
    from ray.train.torch import TorchTrainer
    from gleaner.config import GleanerConfig
    from gleaner.runtime import init_ray

    @ray.remote
    def say(message):
        logging.getLogger({CLEANER_LOGGER!r}).warning(message)

    init_ray(GleanerConfig())
    ray.get([say.remote("Failed to query Ray Train Controller actor state. (probe)"),
             say.remote("Detected that the Ray Train controller actor (probe) is dead.")])
    TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=__import__("sys").argv[1])).fit()
    time.sleep(1)  # the log monitor's last lines reach the console
    ray.shutdown()
    """
)


def test_ray_trains_placement_group_cleaner_warnings_stay_off_the_console(tmp_path) -> None:
    """A local Ray has no dashboard, so Ray Train's cleaner logs one state-API warning a
    second of every fit; workers drop exactly that line (other lines of the logger stay)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    fit = subprocess.run([sys.executable, "-c", FIT_A_WHILE, str(tmp_path / "ray")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    console = fit.stdout + fit.stderr
    assert "Detected that the Ray Train controller actor (probe) is dead." in console
    assert "Failed to query Ray Train Controller actor state" not in console
