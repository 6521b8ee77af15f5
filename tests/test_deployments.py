"""prefect.yaml deployed to a real Prefect server and run by a real process worker.

`prefect deploy --all` from the repository's own prefect.yaml, work pools from
infra/prefect/work_pools.py, `prefect worker start` as a subprocess, the curate
deployment run on a small real sample with every LLM call going to a loopback
server; then, through the Prefect API as the UI shows it: the flow run and its
stage subflows completed, task runs with meaningful names, the artifacts, the
published dataset version, and the trigger that started the finetune
deployment from the `gleaner.selection.completed` event.

The worker has no API key in its environment: the work pool references a
Prefect Secret block, the worker resolves it per flow run, the loopback LLM
server checks that the key arrived, and nothing Prefect or the store keeps
about the run holds it.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time

import pytest

from tests.support.openai_server import OpenAIStub
from tests.support.pipeline import (
    ROOT,
    Worker,
    artifacts_of,
    leaks,
    pipeline_responder,
    prefect_cli,
    prefect_env,
    prefect_record_texts,
    run_tree,
    store_texts,
    task_runs_of,
    wait_for_flow_run,
    write_config,
    write_sample,
)

sys.path.insert(0, str(ROOT / "infra" / "prefect"))
import work_pools  # noqa: E402  (a script under infra/, not a package)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]
SAMPLE_ROWS = 24
SECRET_BLOCK = "gleaner-openai-key"
SECRET = "sk-gleaner-deploy-canary-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory):
    """Pools, deployments (with their schedule and triggers) and a worker on gleaner-cpu."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    work = tmp_path_factory.mktemp("deployments")
    env = prefect_env(prefect_api, PREFECT_WORKER_QUERY_SECONDS="2",
                      PREFECT_WORKER_PREFETCH_SECONDS="5")
    env.pop("OPENAI_API_KEY", None)  # the key comes from the Secret block only
    Secret(value=SECRET).save(SECRET_BLOCK, overwrite=True)
    work_pools.main(["local", "--secret", f"OPENAI_API_KEY={SECRET_BLOCK}"])
    result = prefect_cli("--no-prompt", "deploy", "--all", env=env, timeout_s=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    state = {"env": env, "work": work, "deploy_output": result.stdout,
             "worker": Worker(work_pools.CPU_POOL, env, work / "worker.log").start()}
    try:
        yield state
    finally:
        state["worker"].stop()  # the one serving now (a test may start another)
        with get_client(sync_client=True) as client:
            for name in ("curate/curate", "finetune/finetune", "evaluate/evaluate"):
                with contextlib.suppress(ObjectNotFound):  # absent when deploy failed part-way
                    client.delete_deployment(client.read_deployment_by_name(name).id)
            for automation in client.read_automations():
                if automation.name.startswith(("finetune", "evaluate")):
                    client.delete_automation(automation.id)
            for name in (work_pools.CPU_POOL, work_pools.GPU_POOL):
                client.delete_work_pool(name)
            client.delete_block_document(client.read_block_document_by_name(
                SECRET_BLOCK, block_type_slug="secret").id)


def test_deploy_all_creates_deployments_schedule_and_triggers(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        curate = client.read_deployment_by_name("curate/curate")
        finetune = client.read_deployment_by_name("finetune/finetune")
        evaluate = client.read_deployment_by_name("evaluate/evaluate")
        assert curate.work_pool_name == work_pools.CPU_POOL
        assert finetune.work_pool_name == work_pools.GPU_POOL
        assert evaluate.work_pool_name == work_pools.CPU_POOL
        (schedule,) = curate.schedules
        assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
        assert curate.global_concurrency_limit.limit == 1  # one refresh at a time
        assert curate.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert curate.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(ROOT)}}]
        automations = {a.name: a for a in client.read_automations()}
        started = {a.name: getattr(a.actions[0], "deployment_id", None)  # the zombie rule
                   for a in automations.values()}                         # starts none
        finetune_triggers = [automations[n] for n, d in started.items() if d == finetune.id]
        assert finetune_triggers and finetune_triggers[0].trigger.expect == {
            "gleaner.selection.completed"}
        assert evaluate.id in started.values()


def test_worker_runs_the_curate_deployment_end_to_end(deployed, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.deployments import run_deployment
    from prefect.states import Completed

    from gleaner.store import Store
    from gleaner.tasks.publish.versions import list_versions

    store = tmp_path / "store"
    sample = write_sample(tmp_path / "alpaca_sample.json", SAMPLE_ROWS)
    run_id = f"deploy-{int(time.time())}"
    with OpenAIStub(pipeline_responder) as llm:
        config = write_config(tmp_path / "gleaner.yaml", str(store), llm.base_url)
        flow_run = run_deployment(
            "curate/curate",
            parameters={"sources": [str(sample)], "store": str(store), "config": str(config),
                        "run_id": run_id},
            timeout=0,
        )
        with get_client(sync_client=True) as client:
            finished = wait_for_flow_run(client, flow_run.id, timeout_s=600,
                                         worker=deployed["worker"])
            assert finished.state.type.value == "COMPLETED", deployed["worker"].log()[-6000:]
            rating_requests = llm.count(lambda body: "messages" in body)
            # the key reached the flow run from the Secret block, and was used
            authorizations = {h.get("authorization") for h in llm.request_headers}
            assert authorizations == {f"Bearer {SECRET}"}

            tree = run_tree(client, flow_run.id)
            stages = {run.name for run in tree}
            assert f"curate-{run_id}" in stages and f"rate-{run_id}" in stages
            assert all(run.state.type.value == "COMPLETED" for run in tree)

            task_runs = task_runs_of(client, tree)
            assert task_runs and all(t.state.type.value == "COMPLETED" for t in task_runs)
            names = {t.name.rsplit("-", 1)[0] for t in task_runs}
            assert "publish-dataset-version" in names, names
            # the rating batches ran on Ray workers and reported to the same API
            assert "rate-batch" in names, names

            artifacts = {a.key: a for a in artifacts_of(client, tree) if a.key}
            counts = artifacts[f"curate-{run_id}"]
            assert counts.type == "markdown"
            assert f"| read | {SAMPLE_ROWS} |" in counts.data
            assert "| selected |" in counts.data

            # The selection event started the finetune deployment with this run's parameters.
            finetune = client.read_deployment_by_name("finetune/finetune")
            triggered = _wait_for_triggered_run(client, finetune.id, run_id)
            assert triggered.parameters["config"]["store"]["url"] == str(store)
            # No GPU worker here: play the GPU pool's part by marking that run Completed,
            # which must start the evaluate deployment with the same run id and config.
            # (gleaner-cpu is paused meanwhile so its worker doesn't start a real evaluation)
            client.update_work_pool(work_pools.CPU_POOL, WorkPoolUpdate(is_paused=True))
            try:
                client.set_flow_run_state(triggered.id, Completed(), force=True)
                evaluate = client.read_deployment_by_name("evaluate/evaluate")
                evaluation = _wait_for_triggered_run(client, evaluate.id, run_id)
                assert evaluation.parameters["config"] == triggered.parameters["config"]
                for queued in (triggered, evaluation):  # don't leave them for a later worker
                    client.delete_flow_run(queued.id)
            finally:
                client.update_work_pool(work_pools.CPU_POOL, WorkPoolUpdate(is_paused=False))

            # nothing Prefect keeps, the worker's log or the store holds the key
            kept = prefect_record_texts(client, prefect_api, tree)
            kept["deployment"] = client.read_deployment_by_name("curate/curate").model_dump_json()
            kept["worker log"] = deployed["worker"].log()
            kept.update(store_texts(store))
            assert len(kept) > 20
            assert leaks(SECRET, kept) == []

    assert rating_requests >= SAMPLE_ROWS  # every kept example was rated through the worker
    (version,) = list_versions(Store(str(store)), "curated")
    assert version["run_id"] == run_id
    assert version["diff"]["added"] == version["counts"]["examples"] > 0


def _wait_for_triggered_run(client, deployment_id, run_id, timeout_s: float = 60):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
        for run in runs:
            if run.parameters.get("run_id") == run_id:
                return run
        time.sleep(1)
    raise AssertionError(f"no triggered run of deployment {deployment_id} for run {run_id}")


def test_work_pool_stores_a_reference_not_the_key(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(work_pools.CPU_POOL)
    env = pool.base_job_template["variables"]["properties"]["env"]["default"]
    assert env == {"OPENAI_API_KEY": "{{ prefect.blocks.secret.gleaner-openai-key }}"}
    assert SECRET not in pool.model_dump_json()
    assert SECRET not in deployed["deploy_output"]


def _run_curate(client, deployed, sources, store, config, run_id):
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        "curate/curate",
        parameters={"sources": sources, "store": str(store), "config": str(config),
                    "run_id": run_id},
        timeout=0,
    )
    finished = wait_for_flow_run(client, flow_run.id, timeout_s=600, worker=deployed["worker"])
    assert finished.state.type.value == "COMPLETED", deployed["worker"].log()[-6000:]
    return finished


def test_scheduled_refresh_rates_only_changed_rows_and_reports_the_diff(deployed, tmp_path):
    """Run, change 5 % of the source (edit, add, delete), run again through the deployment."""
    import json

    from prefect.client.orchestration import get_client

    from gleaner.runs import read_run
    from gleaner.store import Store
    from gleaner.tasks.publish.versions import list_versions, read_version

    rows = 60
    store = tmp_path / "store"
    source = write_sample(tmp_path / "pool.json", rows)
    records = json.loads(source.read_text())
    with OpenAIStub(pipeline_responder) as llm, get_client(sync_client=True) as client:
        config = write_config(tmp_path / "gleaner.yaml", str(store), llm.base_url, budget=20)
        _run_curate(client, deployed, [str(source)], store, config, "refresh-1")
        first_rating_requests = llm.count(lambda body: "messages" in body)
        assert first_rating_requests == rows + 1  # and the rate stage's one probe request

        # 5 % of 60 rows: one edited, one deleted, one added (from further down the real file)
        records[10]["output"] += " (revised)"
        del records[20]
        extra = json.loads(write_sample(tmp_path / "extra.json", 1, start=rows).read_text())
        records += extra
        source.write_text(json.dumps(records, ensure_ascii=False))
        llm.reset()
        _run_curate(client, deployed, [str(source)], store, config, "refresh-2")
        rating_requests = llm.count(lambda body: "messages" in body)

    # only the edited and the added example were rated again (and the one probe request)
    assert rating_requests == 2 + 1
    st = Store(str(store))
    first, second = list_versions(st, "curated")
    assert (first["run_id"], second["run_id"]) == ("refresh-1", "refresh-2")
    diff = second["diff"]
    assert diff["requests_sent"] == rating_requests
    assert diff["previous_version"] == 1 and diff["previous_run_id"] == "refresh-1"
    # the reported dataset diff is the real difference between the two published versions
    before = set(read_version(st, "curated", 1).column("id").to_pylist())
    after = set(read_version(st, "curated", 2).column("id").to_pylist())
    assert (diff["added"], diff["removed"], diff["unchanged"]) == (
        len(after - before), len(before - after), len(after & before))
    # and the source pool's diff: edited + added are new ids, edited-old + deleted are gone
    pool_diff = read_run(st, "refresh-2")["curate"]["pool_diff"]
    assert (pool_diff["added"], pool_diff["removed"], pool_diff["unchanged"]) == (2, 2, rows - 2)



def test_a_curate_run_waiting_for_approval_is_suspended_and_resumes_on_a_worker(
        deployed, tmp_path):
    """publish.approval: required: the deployment run is suspended at the gate (its process
    exits, the worker and the deployment's concurrency slot are free); approved through the
    Prefect API (as the UI's Resume form does), it runs again on the worker, re-enters with
    every stage before the gate reused, and publishes, the comment in the version's card."""
    from pathlib import Path

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from gleaner.runs import read_approval
    from gleaner.store import Store
    from gleaner.tasks.publish.versions import list_versions

    store = tmp_path / "store"
    sample = write_sample(tmp_path / "sample.json", SAMPLE_ROWS)
    run_id = f"deploy-approval-{int(time.time())}"
    with OpenAIStub(pipeline_responder) as llm, get_client(sync_client=True) as client:
        config = write_config(tmp_path / "gleaner.yaml", str(store), llm.base_url)
        document = yaml.safe_load(config.read_text())
        document["publish"] = {"approval": "required", "approval_timeout_s": 900}
        config.write_text(yaml.safe_dump(document, sort_keys=False))
        flow_run = run_deployment("curate/curate", timeout=0, parameters={
            "sources": [str(sample)], "store": str(store), "config": str(config),
            "run_id": run_id})
        deadline = time.monotonic() + 600
        while (state := client.read_flow_run(flow_run.id).state) is None or (
                state.name != "Suspended"):
            assert state is None or state.type.value not in ("COMPLETED", "FAILED", "CRASHED",
                                                             "CANCELLED"), (
                f"{state.name}: {state.message}\n{deployed['worker'].log()[-6000:]}")
            assert time.monotonic() < deadline, deployed["worker"].log()[-6000:]
            time.sleep(1)
        record = read_approval(Store(str(store)), run_id)
        assert (record["state"], record["flow_run_id"], record["deployment"]) == (
            "waiting", str(flow_run.id), True)
        rating_requests = llm.count(lambda body: "messages" in body)
        limit = client.read_deployment_by_name("curate/curate").global_concurrency_limit
        slots = client.read_global_concurrency_limit_by_name(limit.name)
        assert slots.active_slots == 0  # the waiting run holds no slot

        # The run resumes on a worker without a process limit: Prefect 3.8.8's process worker
        # started with --limit dies picking up a run it once submitted ("this borrower is
        # already holding one of this CapacityLimiter's tokens", PrefectHQ/prefect #16806);
        # docs/operations.md says so. The deployment's own concurrency limit still holds.
        deployed["worker"].stop()
        deployed["worker"] = Worker(work_pools.CPU_POOL, deployed["env"],
                                    deployed["work"] / "worker-resume.log", limit=None).start()
        result = client.resume_flow_run(flow_run.id, run_input={
            "approve": True, "by": "carol", "comment": "ship it"})
        assert result.status.value == "ACCEPT", result
        finished = wait_for_flow_run(client, flow_run.id, timeout_s=600,
                                     worker=deployed["worker"])
        assert (finished.state.type.value, finished.state.name) == ("COMPLETED", "Completed"), (
            deployed["worker"].log()[-6000:])
        # the stages before the gate reused their output: no example was rated twice
        assert llm.count(lambda body: "messages" in body) <= rating_requests + 1

    (version,) = list_versions(Store(str(store)), "curated")
    assert version["run_id"] == run_id
    decided = read_approval(Store(str(store)), run_id)
    assert (decided["state"], decided["by"], decided["note"]) == ("approved", "carol", "ship it")
    assert "ship it" in (Path(version["path"]).parent / "README.md").read_text()
