"""Stages on a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``).

- A local-folder store on a cluster of more than one node is refused before any work: no
  request reaches the LLM and the store gets no part.
- With an ``s3://`` store on the moto server, rating (Prefect tasks) and embedding (one
  actor per node) run batches on both nodes; each worker reads its rows from the store:
  the driver reads only the input's ``id`` column, ships batch specs that hold no example
  text, and gets counts back, never rows.

Ray is initialised once per process and the session may already hold its local Ray, so the
cluster runs in a child process (tests/support/cluster_run.py), once for this module: it
runs the scenarios of the tests selected here (the embedding one loads MiniLM: slow).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gleaner.runs import read_run
from gleaner.schema import examples_to_table
from gleaner.store import Store
from gleaner.tasks.rate.stage import RATING_SCHEMA
from tests.support.cluster_run import ClusterRun, found_texts, run_cluster
from tests.support.faults import examples, stable_score

pytestmark = pytest.mark.timeout(480)

ROWS = 240
RATE_BATCH, EMBED_BATCH = 20, 40
REFUSE_ROWS = 10
# Columns of example text: the driver reads none of them
TEXT_COLUMNS = {"instruction", "input", "output", "conversation", "history", "text"}
# Every example's instruction and output hold these: nothing the driver ships or receives may
NEEDLES = ["Explain item", "is an example used to test the rating stage"]
SCENARIOS = {
    "test_local_folder_store_is_refused_before_any_work": "refuse",
    "test_rating_runs_on_both_nodes_each_reading_its_batch_from_s3": "rate",
    "test_embedding_runs_one_actor_per_node_each_reading_its_batch_from_s3": "embed",
}


def _selected(request: pytest.FixtureRequest) -> list[str]:
    names = {item.originalname for item in request.session.items
             if getattr(item, "module", None) is not None and item.module.__name__ == __name__}
    return [s for name, s in SCENARIOS.items() if name in names]


@pytest.fixture(scope="module")
def cluster(request, prefect_api, moto_server, tmp_path_factory) -> dict[str, Any]:
    """One child process: the two-node cluster, the selected scenarios, their results."""
    import s3fs

    workdir = tmp_path_factory.mktemp("cluster")
    bucket = f"gleaner-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server},
                           skip_instance_cache=True)
    fs.mkdir(bucket)
    s3_store = {"url": f"s3://{bucket}/store", "options": {"endpoint_url": moto_server}}
    local_store = {"url": str(workdir / "local-store")}
    run_id, refuse_id = f"cluster-{uuid.uuid4().hex[:8]}", f"refuse-{uuid.uuid4().hex[:8]}"

    keys = [f"k{i}" for i in range(ROWS)]
    batch = examples(keys)
    Store(s3_store["url"], s3_store["options"]).write_part(
        run_id, "ingest", 0, examples_to_table(batch))
    Store(local_store["url"]).write_part(
        refuse_id, "ingest", 0, examples_to_table(examples(keys[:REFUSE_ROWS])))

    spec = {
        "prefect_api": prefect_api, "nodes": 2, "cpus_per_node": 1,
        "scenarios": _selected(request), "run_id": run_id, "refuse_run_id": refuse_id,
        "s3_store": s3_store, "local_store": local_store,
        "needles": NEEDLES + [e.instruction for e in batch[:: ROWS // 12]],
        "llm_delay_s": 0.05,
        "rate": {"rate.resources.batch_size": RATE_BATCH, "rate.resources.concurrency": 4},
        "embed": {"embed.resources.batch_size": EMBED_BATCH, "embed.resources.actors": 2,
                  "embed.resources.cpus": 1},
    }
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    run = run_cluster(spec, env, workdir, timeout_s=420)
    result = run.result
    if "error" in result or "cluster" not in result:
        pytest.fail(f"the cluster run failed: {json.dumps(result.get('error'))[:3000]}\n"
                    f"{run.log[-6000:]}")
    return {"run": run, "result": result, "spec": spec, "fs": fs, "bucket": bucket,
            "s3_store": s3_store, "local_store": local_store, "run_id": run_id,
            "refuse_id": refuse_id, "key_of": {e.id: k for e, k in zip(batch, keys,
                                                                       strict=True)}}


def _scenario(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    run: ClusterRun = cluster["run"]
    outcome = cluster["result"]["scenarios"].get(name)
    assert outcome is not None, f"scenario {name} did not run:\n{run.log[-6000:]}"
    return outcome


def _ok(outcome: dict[str, Any], run: ClusterRun) -> dict[str, Any]:
    assert "error" not in outcome, f"{outcome['error']}\n{outcome.get('traceback')}\n" \
                                   f"{run.log[-4000:]}"
    return outcome["summary"]


def _prefect_runs(flow_run_name: str) -> tuple[Any, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    async def go() -> tuple[Any, list[Any]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
            assert len(runs) == 1, [r.name for r in runs]
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])), limit=200)
            return runs[0], tasks

    return asyncio.run(go())


def _s3_parts(cluster: dict[str, Any], stage: str) -> list[str]:
    fs = cluster["fs"]
    directory = f"{cluster['bucket']}/store/runs/{cluster['run_id']}/{stage}"
    fs.invalidate_cache()
    return sorted(p for p in fs.ls(directory, detail=False) if p.rsplit("/", 1)[-1].startswith(
        "part-"))


def test_the_text_check_finds_rows_in_a_pickle() -> None:
    """The control for the checks below: rows pickled as Arrow or as dicts show their text."""
    from ray import cloudpickle

    table = examples_to_table(examples(["c1", "c2"]))
    for payload in (table, table.slice(1, 1), table.to_pylist()):
        assert found_texts(cloudpickle.dumps(payload), NEEDLES) == NEEDLES


def _check_driver(outcome: dict[str, Any], runner: str, batches: int) -> None:
    """The driver read ids only, shipped specs without text, got counts back."""
    spy = outcome["spy"]
    reads = [e for e in spy["events"] if e["kind"] == "dataset"]
    ingest = [e for e in reads if any("/ingest/" in p for p in e["paths"])]
    assert ingest, "the driver never indexed its input"
    assert all(e["columns"] == ["id"] and e["how"] == "to_table" for e in ingest), ingest
    for event in reads:  # the rest: the output's counts columns (summary), cache ids
        assert event["columns"] is not None, event
        assert not TEXT_COLUMNS & set(event["columns"]), event
    assert not [e for e in spy["events"] if e["kind"] in ("parquet", "read_segments")], \
        "the driver read rows"
    (shipped,) = spy["shipped"]
    assert shipped["runner"] == runner and shipped["batches"] == batches
    assert shipped["texts_found"] == [], "example text in what the driver sent the workers"
    assert sum(stop - start for _, start, stop in shipped["segments"]) == ROWS
    assert all("/ingest/part-" in path for path, _, _ in shipped["segments"])
    assert shipped["bytes"] < 100_000, shipped["bytes"]
    results = spy["results"]
    assert len(results) == batches
    for item in results:
        assert item["error"] is None and item["texts_found"] == [], item
        assert item["bytes"] < 2_000, item
        assert all(isinstance(v, int | float | str | None) for v in item["result"].values()), \
            item["result"]
    assert sum(item["result"]["rows"] for item in results) == ROWS


def _check_nodes(summary: dict[str, Any], cluster: dict[str, Any], batches: int) -> None:
    nodes = summary["nodes"]
    assert len(cluster["result"]["cluster"]["nodes"]) == 2
    assert len(nodes) >= 2 and set(nodes) <= set(cluster["result"]["cluster"]["nodes"]), nodes
    assert all(count >= 1 for count in nodes.values()) and sum(nodes.values()) == batches


@pytest.mark.e2e  # a two-node Ray cluster on loopback (one child process)
def test_local_folder_store_is_refused_before_any_work(cluster) -> None:
    outcome = _scenario(cluster, "refuse")
    assert outcome.get("error_type") == "ValueError", outcome
    message = outcome["error"]
    assert cluster["local_store"]["url"] in message and "local folder" in message
    assert "2 node(s)" in message and "their own disks" in message
    assert "s3://" in message and "docs/operations.md" in message
    assert outcome["requests"] == 0  # not even the probe
    root = Path(cluster["local_store"]["url"])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [f"runs/{cluster['refuse_id']}/ingest/part-00000.parquet"]  # no part, lease
    flow_run, task_runs = _prefect_runs(f"rate-{cluster['refuse_id']}")
    assert flow_run.state.is_failed() and task_runs == []


@pytest.mark.e2e  # a two-node Ray cluster on loopback (one child process)
def test_rating_runs_on_both_nodes_each_reading_its_batch_from_s3(cluster) -> None:
    run, outcome = cluster["run"], _scenario(cluster, "rate")
    summary = _ok(outcome, run)
    batches = ROWS // RATE_BATCH
    assert summary["status"] == "completed" and summary["batches"] == batches
    assert summary["batches_submitted"] == batches and summary["batches_failed"] == 0
    assert summary["examples"] == summary["read"] == summary["rated"] == ROWS
    assert summary["failed"] == 0 and summary["kept"] + summary["below"] == ROWS
    assert summary["requests"] == outcome["requests"] == ROWS + 1  # and the probe
    _check_nodes(summary, cluster, batches)

    # every batch's part is in the bucket, every example rated once, by its own text
    parts = _s3_parts(cluster, "rate")
    assert [p.rsplit("/", 1)[-1] for p in parts] == [f"part-{i:05d}.parquet"
                                                     for i in range(batches)]
    store = Store(cluster["s3_store"]["url"], cluster["s3_store"]["options"])
    rows = store.read_stage(cluster["run_id"], "rate", schema=RATING_SCHEMA).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(cluster["key_of"])
    assert all(r["status"] == "ok" and r["score"] == stable_score(cluster["key_of"][r["id"]])
               for r in rows)
    assert read_run(store, cluster["run_id"])["rate"]["nodes"] == summary["nodes"]

    _check_driver(outcome, "run_tasks", batches)
    by_node: dict[str, int] = {}
    for item in outcome["spy"]["results"]:
        by_node[item["result"]["node"]] = by_node.get(item["result"]["node"], 0) + 1
    assert by_node == summary["nodes"]

    # Prefect: one task run per batch under the flow run, and no example text in any of them
    flow_run, task_runs = _prefect_runs(f"rate-{cluster['run_id']}")
    assert flow_run.state.is_completed()
    batch_runs = [t for t in task_runs if t.name.startswith("rate-batch-")]
    assert sorted(t.name for t in batch_runs) == [f"rate-batch-{i:05d}" for i in range(batches)]
    assert all(t.state.is_completed() for t in batch_runs)
    assert all(set(t.task_inputs) == {"job", "spec"} for t in batch_runs)
    recorded = flow_run.model_dump_json() + "".join(t.model_dump_json() for t in task_runs)
    assert cluster["run_id"] in recorded
    assert not [n for n in cluster["spec"]["needles"] if n in recorded]


@pytest.mark.slow  # each actor loads MiniLM
@pytest.mark.e2e  # a two-node Ray cluster on loopback (one child process)
def test_embedding_runs_one_actor_per_node_each_reading_its_batch_from_s3(cluster) -> None:
    run, outcome = cluster["run"], _scenario(cluster, "embed")
    summary = _ok(outcome, run)
    batches = ROWS // EMBED_BATCH
    assert summary["status"] == "completed" and summary["batches"] == batches
    assert summary["batches_submitted"] == batches and summary["batches_failed"] == 0
    assert summary["examples"] == summary["ok"] == summary["made"] == ROWS
    assert summary["failed"] == 0 and summary["dim"] == 384
    _check_nodes(summary, cluster, batches)

    parts = _s3_parts(cluster, "embed")
    assert len(parts) == batches
    store = Store(cluster["s3_store"]["url"], cluster["s3_store"]["options"])
    table = store.read_stage(cluster["run_id"], "embed")
    assert sorted(table.column("id").to_pylist()) == sorted(cluster["key_of"])
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert vectors.shape == (ROWS, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)

    _check_driver(outcome, "run_actors", batches)
    flow_run, task_runs = _prefect_runs(f"embed-{cluster['run_id']}")
    assert flow_run.state.is_completed()
    recorded = flow_run.model_dump_json() + "".join(t.model_dump_json() for t in task_runs)
    assert not [n for n in cluster["spec"]["needles"] if n in recorded]
