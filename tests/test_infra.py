"""The operating files parse, validate with the tools that consume them, and name what exists.

- infra/ray/cluster.yaml through Ray's own cluster-launcher config preparation;
- infra/k8s/raycluster.yaml: a KubeRay RayCluster with CPU and GPU groups;
- prefect.yaml: every entrypoint is a Prefect flow, parameters and trigger
  templates name real flow parameters, triggers and schedules validate;
- infra/prefect/work_pools.py: the GPU template requests nvidia.com/gpu;
- infra/local-stack.sh: starts a Prefect server and a Ray head, and stops them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "prefect"))
import work_pools  # noqa: E402  (infra/prefect/work_pools.py is a script, not a package)

PREFECT_YAML = ROOT / "prefect.yaml"
CLUSTER_YAML = ROOT / "infra" / "ray" / "cluster.yaml"
KUBERAY_YAML = ROOT / "infra" / "k8s" / "raycluster.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
SECRET_LOOKING = re.compile(r"(sk-[A-Za-z0-9]{8,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY)")


def load_prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in load_prefect_yaml()["deployments"]}


# ---- Ray cluster launcher ------------------------------------------------------


def test_ray_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.commands import prepare_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))  # fills defaults, validates
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "batches must not land on the head"
    cpu = [t for t in types.values() if t["resources"].get("rating")]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert cpu and all(not t["resources"].get("GPU") for t in cpu)
    assert gpu
    assert all(t["resources"].get("embedding") and t["resources"].get("training") for t in gpu)
    assert all(t["max_workers"] >= 1 for t in cpu + gpu)
    assert any(t["resources"]["GPU"] == 8 for t in gpu)  # a node for sharded 7B training


def test_ray_cluster_installs_this_project_on_every_node():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    setup = " && ".join(config["setup_commands"])  # setup_commands run on head and workers
    assert f'pip install "{mount}[local-llm]"' in setup
    assert "gleaner --help" in setup  # the CLI entry point works on the node
    eight = config["available_node_types"]["gpu_train_8x"]  # sharded training's node
    assert f'pip install "{mount}[local-llm,gpu]"' in eight["worker_setup_commands"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "local-llm" in project["optional-dependencies"]
    # Images carry the Ray version gleaner is tested with.
    images = [config["docker"]["image"], config["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if "docker" in t]
    assert all(f"rayproject/ray:{ray.__version__}-" in image for image in images), images
    assert any(image.endswith("-gpu") for image in images)
    assert not SECRET_LOOKING.search(CLUSTER_YAML.read_text())


def test_gleaner_cli_entry_point_exists():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gleaner"] == "gleaner.flows.cli:main"
    result = subprocess.run(
        [sys.executable, "-c", "from gleaner.flows.cli import main; main()", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


# ---- KubeRay ------------------------------------------------------------------


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY_YAML.read_text())}


def test_kuberay_manifest_has_head_cpu_and_gpu_groups():
    docs = kuberay_documents()
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {"gcs", "client", "dashboard"} <= head_ports
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-embed-train"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu-embed-train"]["rayStartParams"]["num-gpus"] == "1"
    cpu = groups["cpu-rating"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    # KubeRay passes custom resources to `ray start --resources` as a quoted JSON string
    rating = json.loads(json.loads(groups["cpu-rating"]["rayStartParams"]["resources"]))
    assert rating == {"rating": 16}
    gpu_resources = json.loads(json.loads(groups["gpu-embed-train"]["rayStartParams"]["resources"]))
    assert gpu_resources == {"embedding": 1, "training": 1}
    eight = groups["gpu-train-8x"]
    assert eight["rayStartParams"]["num-gpus"] == "8"
    pod = eight["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert json.loads(json.loads(eight["rayStartParams"]["resources"]))["training"] == 8
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_pods_run_the_gleaner_image_and_take_secrets_by_reference():
    docs = kuberay_documents()
    cluster = docs["RayCluster"]["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    dockerfile = DOCKERFILE.read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"].startswith("gleaner:")
        assert container["workingDir"] == workdir
        env = {e["name"]: e for e in container["env"]}
        assert env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "gleaner-prefect"
        key = env["OPENAI_API_KEY"]
        assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"] == "gleaner-llm"
    assert docs["ConfigMap"]["data"]["PREFECT_API_URL"].endswith("/api")
    assert not SECRET_LOOKING.search(KUBERAY_YAML.read_text())


# ---- prefect.yaml --------------------------------------------------------------


@pytest.fixture(scope="module")
def flows_by_deployment() -> dict:
    from prefect.flows import Flow, load_flow_from_entrypoint

    loaded = {}
    for name, deployment in deployments().items():
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert isinstance(flow, Flow), f"{name}: {function} is not a Prefect flow"
        loaded[name] = flow
    return loaded


def test_prefect_yaml_declares_the_three_deployments():
    found = deployments()
    assert set(found) == {"curate", "finetune", "evaluate"}
    assert found["curate"]["entrypoint"] == "flows/curate.py:curate_flow"
    assert found["finetune"]["entrypoint"] == "flows/finetune_flow.py:finetune_flow"
    assert found["evaluate"]["entrypoint"] == "flows/evaluate_flow.py:evaluate_flow"
    assert found["finetune"]["work_pool"]["name"] == work_pools.GPU_POOL
    assert {found[n]["work_pool"]["name"] for n in ("curate", "evaluate")} == {work_pools.CPU_POOL}
    pull = load_prefect_yaml()["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $GLEANER_CHECKOUT }}"
    assert not SECRET_LOOKING.search(PREFECT_YAML.read_text())
    assert not re.search(r"(?i)(api_key|password|secret|token)\s*:", PREFECT_YAML.read_text())


def test_curate_schedule_is_a_valid_weekly_cron():
    from prefect.client.schemas.schedules import CronSchedule

    (schedule,) = deployments()["curate"]["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.timezone == "UTC"
    assert schedule["cron"].split()[2:] == ["*", "*", "1"]  # every Monday


def test_triggers_validate_and_template_real_flow_parameters(flows_by_deployment):
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    for name in ("finetune", "evaluate"):
        specs = deployments()[name]["triggers"]
        (trigger,) = _initialize_deployment_triggers(name, specs)
        flow_params = set(inspect.signature(flows_by_deployment[name].fn).parameters)
        assert set(trigger.parameters) <= flow_params, (name, trigger.parameters)
        assert all(str(v).startswith("{{ ") for v in trigger.parameters.values())
    finetune = deployments()["finetune"]["triggers"][0]
    assert finetune["expect"] == ["gleaner.selection.completed"]
    assert finetune["match"]["prefect.resource.id"] == "gleaner.run.*"
    evaluate = deployments()["evaluate"]["triggers"][0]
    assert evaluate["match_related"]["prefect.resource.name"] == "finetune"


def test_deployment_parameters_are_flow_parameters(flows_by_deployment):
    for name, deployment in deployments().items():
        flow_params = set(inspect.signature(flows_by_deployment[name].fn).parameters)
        assert set(deployment.get("parameters") or {}) <= flow_params, name
    curate = set(inspect.signature(flows_by_deployment["curate"].fn).parameters)
    assert {"sources", "store", "config", "run_id", "train", "evaluate"} <= curate


def test_curate_flow_emits_the_event_the_finetune_trigger_expects(monkeypatch):
    import fnmatch

    import prefect.events

    from gleaner.config import GleanerConfig
    from gleaner.tasks.publish import release

    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: sent.append(event))
    version = {"uri": "x", "name": "curated", "version": 1, "counts": {"examples": 3}}
    release.announce_selection(GleanerConfig(), "run-7", version)
    [event] = sent
    trigger = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "finetune")["triggers"][0]
    assert event["event"] in trigger["expect"]
    assert fnmatch.fnmatch(event["resource"]["prefect.resource.id"],
                           trigger["match"]["prefect.resource.id"])
    assert event["payload"]["run_id"] == "run-7" and event["payload"]["config"]["store"]


# ---- work pools -----------------------------------------------------------------


def test_gpu_pool_template_requests_gpus_and_renders():
    from prefect.utilities.templating import apply_values

    plan = {name: (kind, template) for name, kind, template in work_pools.pool_plan("kubernetes")}
    kind, template = plan[work_pools.GPU_POOL]
    assert kind == "kubernetes"
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    rendered = apply_values(template["job_configuration"], defaults)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == work_pools.DEFAULT_GPU_IMAGE
    assert container["envFrom"] == [{"secretRef": {"name": "gleaner-llm", "optional": True}}]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    _, cpu_template = plan[work_pools.CPU_POOL]
    cpu_limits = work_pools._container(cpu_template)["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits
    local = {name: kind for name, kind, _ in work_pools.pool_plan("local")}
    assert local == {work_pools.CPU_POOL: "process", work_pools.GPU_POOL: "process"}


def test_work_pools_script_creates_pools_on_a_server(prefect_api):
    from prefect.client.orchestration import get_client

    assert work_pools.main(["kubernetes"]) == 0
    with get_client(sync_client=True) as client:
        gpu = client.read_work_pool(work_pools.GPU_POOL)
        assert gpu.type == "kubernetes"
        assert "gpu_limit" in gpu.base_job_template["variables"]["properties"]
    again = work_pools.ensure_pools(work_pools.pool_plan("kubernetes"))
    assert all(line.startswith("kept") for line in again)
    with pytest.raises(SystemExit, match="delete it first"):
        work_pools.ensure_pools(work_pools.pool_plan("local"))
    with get_client(sync_client=True) as client:
        for name in (work_pools.CPU_POOL, work_pools.GPU_POOL):
            client.delete_work_pool(name)


# ---- local stack ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_local_stack_starts_and_stops(tmp_path):
    from gleaner.runtime import api_is_healthy, free_port

    env = {
        **os.environ,
        "GLEANER_STACK_DIR": str(tmp_path / "stack"),
        "PREFECT_PORT": str(free_port()),
        "RAY_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_NUM_CPUS": "1",
        "PYTHON": sys.executable,
    }
    env.pop("PREFECT_API_URL", None)
    script = str(ROOT / "infra" / "local-stack.sh")
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                                 timeout=240)
        assert started.returncode == 0, started.stderr
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        )
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        assert api_is_healthy(exports["PREFECT_API_URL"])
        assert exports["RAY_ADDRESS"].endswith(f":{env['RAY_PORT']}")
        assert exports["GLEANER_CHECKOUT"] == str(ROOT)
        probe = subprocess.run(
            [sys.executable, "-c",
             f"import ray; ray.init(address='{exports['RAY_ADDRESS']}', log_to_driver=False); "
             "print(int(ray.cluster_resources()['CPU']))"],
            env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120,
        )
        assert probe.stdout.strip().splitlines()[-1] == "1", probe.stderr[-2000:]
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    # Ray's pointer to "the latest cluster" must not keep naming the stopped head
    current = Path("/tmp/ray/ray_current_cluster")
    assert not (current.exists() and current.read_text().strip().endswith(f":{env['RAY_PORT']}"))
    assert not api_is_healthy(f"http://127.0.0.1:{env['PREFECT_PORT']}/api")
    status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 1 and "ray stopped" in status.stderr
