"""Create the work pools prefect.yaml deploys to, for one machine or for Kubernetes.

    python infra/prefect/work_pools.py local        # every pool a process pool on this machine
    python infra/prefect/work_pools.py kubernetes   # gleaner-cpu / gleaner-gpu run as k8s Jobs
    python infra/prefect/work_pools.py kubernetes --image registry/gleaner:0.1.0 --update
    python infra/prefect/work_pools.py local --secret OPENAI_API_KEY=gleaner-openai-key

Pools:
- ``gleaner-cpu``: curate and evaluate. CPU only; the heavy fan-out goes to Ray.
- ``gleaner-gpu``: finetune. On Kubernetes each run is a Job whose pod requests
  ``nvidia.com/gpu`` (``gpu_limit``, default 1) and tolerates GPU node taints.

Uses PREFECT_API_URL like every Prefect command. The Kubernetes templates start
from the kubernetes worker's default template that ships inside Prefect, so no
registry is fetched; API keys reach the pods from the Kubernetes Secret
``gleaner-llm`` (envFrom), never from the template.

``--secret ENV=BLOCK`` puts a *reference* to a Prefect Secret block into the
pools' job environment: the worker resolves it when it starts a flow run, so
the key reaches the flow's environment (where gleaner reads ``api_key_env``)
without being stored in prefect.yaml, a deployment or a flow run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from importlib import resources
from typing import Any

CPU_POOL = "gleaner-cpu"
GPU_POOL = "gleaner-gpu"
DEFAULT_IMAGE = "gleaner:0.1.0"
DEFAULT_GPU_IMAGE = "gleaner:0.1.0-gpu"
SECRET_NAME = "gleaner-llm"


def bundled_worker_template(worker_type: str) -> dict[str, Any]:
    """A worker type's default base job template, from the registry copy Prefect ships."""
    if worker_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    views = resources.files("prefect.server.api.collections_data.views")
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for collection in metadata.values():
        for worker in collection.values():
            if worker.get("type") == worker_type:
                return copy.deepcopy(worker["default_base_job_configuration"])
    raise KeyError(f"Prefect ships no {worker_type!r} worker template")


def _container(template: dict[str, Any]) -> dict[str, Any]:
    spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    return spec["containers"][0]


def kubernetes_template(image: str, gpus: int = 0) -> dict[str, Any]:
    """The kubernetes template with gleaner's image, its secret, and GPUs when asked."""
    template = bundled_worker_template("kubernetes")
    variables = template["variables"]["properties"]
    variables["image"]["default"] = image
    variables["cpu_request"]["default"] = "2" if not gpus else "8"
    variables["memory_request"]["default"] = "8Gi" if not gpus else "48Gi"
    container = _container(template)
    container["envFrom"] = [{"secretRef": {"name": SECRET_NAME, "optional": True}}]
    container["workingDir"] = "/opt/gleaner"
    if gpus:
        variables["gpu_limit"] = {
            "title": "GPUs",
            "description": "nvidia.com/gpu requested by the job's pod.",
            "type": "integer",
            "default": gpus,
        }
        container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_limit }}"
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return template


def secret_reference(block: str) -> str:
    """Prefect's template for a Secret block's value, e.g. {{ prefect.blocks.secret.my-key }}."""
    return "{{ prefect.blocks.secret." + block + " }}"


def with_secret_env(template: dict[str, Any], secrets: dict[str, str]) -> dict[str, Any]:
    """Default job env entries that reference Secret blocks (resolved by the worker per run)."""
    if not secrets:
        return template
    env = template["variables"]["properties"]["env"]
    env["default"] = {
        **(env.get("default") or {}),
        **{name: secret_reference(block) for name, block in secrets.items()},
    }
    return template


def pool_plan(mode: str, image: str = DEFAULT_IMAGE, gpu_image: str = DEFAULT_GPU_IMAGE,
              secrets: dict[str, str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, type, base job template) for every pool prefect.yaml names."""
    secrets = secrets or {}
    if mode == "local":
        plan = [(CPU_POOL, "process", bundled_worker_template("process")),
                (GPU_POOL, "process", bundled_worker_template("process"))]
    elif mode == "kubernetes":
        plan = [
            (CPU_POOL, "kubernetes", kubernetes_template(image)),
            (GPU_POOL, "kubernetes", kubernetes_template(gpu_image, gpus=1)),
        ]
    else:
        raise ValueError(f"mode must be 'local' or 'kubernetes', not {mode!r}")
    return [(name, kind, with_secret_env(template, secrets)) for name, kind, template in plan]


def parse_secrets(pairs: list[str]) -> dict[str, str]:
    secrets = {}
    for pair in pairs:
        name, sep, block = pair.partition("=")
        if not sep or not name or not block:
            raise SystemExit(f"--secret takes ENV_NAME=SECRET_BLOCK_NAME, not {pair!r}")
        secrets[name] = block
    return secrets


def ensure_pools(plan: list[tuple[str, str, dict[str, Any]]], update: bool = False) -> list[str]:
    """Create missing pools (and update existing ones with --update). Returns what was done."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        for name, pool_type, template in plan:
            try:
                existing = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
                )
                done.append(f"created {name} ({pool_type})")
                continue
            if existing.type != pool_type:
                raise SystemExit(
                    f"work pool {name} exists with type {existing.type!r}, not {pool_type!r}: "
                    f"delete it first (prefect work-pool delete {name})"
                )
            if update:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
                done.append(f"updated {name} ({pool_type})")
            else:
                done.append(f"kept {name} ({pool_type})")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["local", "kubernetes"])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image for gleaner-cpu jobs")
    parser.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="image for gleaner-gpu jobs")
    parser.add_argument("--update", action="store_true", help="rewrite existing pools' templates")
    parser.add_argument("--secret", action="append", default=[], metavar="ENV=BLOCK",
                        help="job env var from a Prefect Secret block (repeatable)")
    args = parser.parse_args(argv)
    plan = pool_plan(args.mode, args.image, args.gpu_image, parse_secrets(args.secret))
    for line in ensure_pools(plan, update=args.update):
        print(line)
    from gleaner.flow_runs import ZOMBIE_AUTOMATION, ensure_zombie_automation

    # flow runs whose worker died end Crashed (their heartbeats stop), not Running forever
    if ensure_zombie_automation():
        print(f"automation {ZOMBIE_AUTOMATION!r} is there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
