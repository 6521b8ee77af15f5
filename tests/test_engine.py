"""The stage engine on a toy stage: plan, parts, cache, failed rows, retries, budget, lease,
fatal errors and kill -9, with a real Prefect API and real Ray (batches as task runs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine import FatalStageError, LeaseHeld, PlanMismatch, StageFailed
from gleaner.engine.lease import Lease
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from tests.support.toy_run import toy_flow
from tests.support.toy_stage import TOY_SCHEMA, processed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _toy_by_value(ray_local):
    """Ray workers get the toy stage's code with the job (tests/ is not installed)."""
    import ray.cloudpickle

    from tests.support import toy_run, toy_stage

    for module in (toy_stage, toy_run):
        ray.cloudpickle.register_pickle_by_value(module)


def pool(n: int, start: int = 0) -> pa.Table:
    return examples_to_table([Example("toy", i, f"instruction {'x' * (i % 7)} {i}",
                                      output=f"out {i}") for i in range(start, start + n)])


def ids_of(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def write_ids(control: Path, name: str, ids: list[str]) -> None:
    (control / name).write_text(json.dumps(ids))


def run(store: Store, run_id: str, control: Path, version: str = "v1", kind: str = "task",
        **section):
    config = GleanerConfig().with_overrides({"store.url": store.url})
    section = {"resources": {"batch_size": 10, "retries": 0, "retry_delay_s": 0}, **section}
    return toy_flow(run_id=run_id, config=config, control=str(control), section=section,
                    version=version, kind=kind)


def rows(store: Store, run_id: str) -> dict[str, dict]:
    table = store.read_stage(run_id, "toy", schema=TOY_SCHEMA)
    out = {r["id"]: r for r in table.to_pylist()}
    assert len(out) == table.num_rows, "a row was written twice"
    return out


def test_plan_resume_cache_and_force(prefect_api, tmp_path) -> None:
    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    first_pool = pool(30)
    store.write_part("a", "ingest", 0, first_pool)
    first = run(store, "a", control)
    assert first["ok"] == 30 and first["failed"] == 0 and first["batches"] == 3
    assert first["total_length"] == sum(len(r["instruction"]) for r in first_pool.to_pylist())
    assert sorted(processed(control)) == sorted(ids_of(first_pool))
    assert store.exists(layout.summary_path(store, "a", "toy"))

    again = run(store, "a", control)  # finished: nothing is processed again
    assert len(processed(control)) == 30 and again["batches_resumed"] == 3
    assert again["ok"] == 30

    with pytest.raises(PlanMismatch, match=r"settings\.version"):
        run(store, "a", control, version="v2")
    with pytest.raises(PlanMismatch, match=r"batching\.batch_size"):
        run(store, "a", control, resources={"batch_size": 7})
    forced = run(store, "a", control, version="v2", force=True)  # afresh: no cache read
    assert forced["cached"] == 0 and len(processed(control)) == 60
    assert {r["version"] for r in rows(store, "a").values()} == {"v2"}

    # another run whose pool overlaps: known ids come from the cache, only new ones are made
    store.write_part("b", "ingest", 0, pa.concat_tables([first_pool, pool(5, start=30)]))
    second = run(store, "b", control)
    assert second["cached"] == 30 and second["ok"] == 35 and len(processed(control)) == 65
    assert all(r["cached"] == (r["id"] in ids_of(first_pool)) for r in rows(store, "b").values())


def test_failed_rows_batches_retry_failed_and_the_budget(prefect_api, tmp_path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    examples = pool(30)
    ids = ids_of(examples)
    store.write_part("f", "ingest", 0, examples)
    write_ids(control, "fail.json", ids[:2])  # two rows the stage cannot make
    write_ids(control, "crash.json", [ids[25]])  # the whole third batch raises
    with pytest.raises(StageFailed, match=r"12 of 30 rows failed"):
        run(store, "f", control)
    written = rows(store, "f")
    assert len(written) == 30  # every row is written, failed ones with their error
    assert [written[i]["error_kind"] for i in ids[:2]] == ["parse", "parse"]
    assert {written[i]["error_kind"] for i in ids[20:]} == {"task"}
    assert "crashed on this batch" in written[ids[25]]["error"]
    summary = store.read_json(layout.summary_path(store, "f", "toy"))
    assert summary["ok"] + summary["failed"] == summary["examples"] == 30
    assert summary["failures"] == {"parse": 2, "task": 10}

    async def state() -> str:
        async with get_client() as client:
            [flow_run] = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["toy-f"])))
            return flow_run.state.type.value

    import asyncio

    assert asyncio.run(state()) == "FAILED"  # red in the UI, not "Completed"

    # the causes are gone: --retry-failed redoes exactly the 12 failed rows
    (control / "fail.json").unlink()
    (control / "crash.json").unlink()
    made = len(processed(control))
    again = run(store, "f", control, retry_failed=True)
    assert len(processed(control)) - made == 12
    assert again["ok"] == 30 and again["failed"] == 0


def test_a_fatal_error_stops_submission(prefect_api, tmp_path) -> None:
    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    examples = pool(100)
    store.write_part("x", "ingest", 0, examples)
    write_ids(control, "fatal.json", ids_of(examples)[:10])  # the first batch
    with pytest.raises(FatalStageError, match="key was rejected"):
        run(store, "x", control)
    # at most the batches already in flight ran (the engine's window: two per CPU of the Ray
    # this process uses, whichever test started it); the rest were never submitted
    import ray

    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    assert window < 10 and len(store.finished_parts("x", "toy")) <= window
    assert store.read_json(layout.summary_path(store, "x", "toy"))["status"] == "stopped"
    (control / "fatal.json").unlink()
    assert run(store, "x", control)["ok"] == 100


def test_a_second_runner_is_refused_while_the_first_holds_the_lease(prefect_api, tmp_path):
    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    store.write_part("l", "ingest", 0, pool(10))
    with Lease(store, "l", "toy", heartbeat_s=0.2), \
            pytest.raises(LeaseHeld, match=r"is being run by .* pid \d+"):
        run(store, "l", control)
    assert processed(control) == []
    assert run(store, "l", control)["ok"] == 10  # released: the next runner goes


def test_actor_stage_runs_the_same(prefect_api, tmp_path) -> None:
    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    store.write_part("act", "ingest", 0, pool(25))
    summary = run(store, "act", control, kind="actor", resources={"batch_size": 10, "actors": 2,
                                                                  "retries": 0})
    assert summary["ok"] == 25 and summary["batches"] == 3
    assert sorted(processed(control)) == sorted(rows(store, "act"))


def test_kill_9_mid_run_then_rerun_gives_the_same_rows(prefect_api, tmp_path) -> None:
    import ray

    store, control = Store(str(tmp_path / "store")), tmp_path / "control"
    control.mkdir()
    examples = pool(120)
    store.write_part("k", "ingest", 0, examples)
    store.write_part("clean", "ingest", 0, examples)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT), "TOY_DELAY_S": "0.4"}
    command = [sys.executable, "-m", "tests.support.toy_run", "--store", store.url,
               "--run-id", "k", "--control", str(control),
               "--section", json.dumps({"resources": {"batch_size": 10}})]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(store.finished_parts("k", "toy")) < 3:
            assert process.poll() is None, process.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the toy run never got going"
            time.sleep(0.05)
    finally:
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    time.sleep(1.0)
    done_at_kill = store.finished_parts("k", "toy")
    assert len(done_at_kill) < 12, "the run finished before it could be killed"
    made_before = processed(control)
    # the rerun: the same flow and section in this process (same Ray, same Prefect API as
    # the killed one), which spares a second interpreter's start-up
    assert "TOY_DELAY_S" not in os.environ
    toy_flow(run_id="k", config=GleanerConfig().with_overrides({"store.url": store.url}),
             control=str(control), section={"resources": {"batch_size": 10}})  # raises if it fails
    made_after = processed(control)[len(made_before):]
    repeated = set(made_before) & set(made_after)
    assert len(repeated) <= 2 * 10  # at most the batches in flight (2 CPUs) are redone
    assert set(made_before) | set(made_after) == set(ids_of(examples))
    clean_control = tmp_path / "clean-control"
    clean_control.mkdir()
    run(store, "clean", clean_control, cache=False)
    resumed, clean = rows(store, "k"), rows(store, "clean")
    assert {i: (r["status"], r["length"]) for i, r in resumed.items()} == {
        i: (r["status"], r["length"]) for i, r in clean.items()}


def test_resources_are_declared_beside_each_stage_class_and_config_keys_override_one_value(
        ) -> None:
    """A stage's batch size and Ray resources live on its class (``declared``); the config
    holds none of them, and a key set there replaces that one value only."""
    import inspect

    from gleaner.config import GleanerConfig, Resources
    from gleaner.engine.stage import ENGINE_RESOURCES, Stage
    from gleaner.tasks.deita.stages import EmbedStage
    from gleaner.tasks.rate.stage import RateStage

    config = GleanerConfig()
    sections = [getattr(config, name) for name in type(config).model_fields]
    held = [s.resources.given() for s in sections if isinstance(getattr(s, "resources", None),
                                                                 Resources)]
    assert held and all(given == {} for given in held), held
    assert set(Stage.declared.given()) == set(ENGINE_RESOURCES)
    assert "declared = declare(" in inspect.getsource(RateStage)
    assert RateStage(config.rate).resources.batch_size == 512  # its own, not the engine's 256
    assert EmbedStage(config.embed).resources.actors == 1
    tuned = config.with_overrides({"rate.resources.concurrency": 3})
    resolved = RateStage(tuned.rate).resources
    assert (resolved.concurrency, resolved.batch_size, resolved.retries) == (3, 512, 2)
