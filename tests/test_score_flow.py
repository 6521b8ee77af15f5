"""The score stage as a flow: batches as Prefect tasks on Ray against a loopback scorer
endpoint, failures recorded per example, finished parts skipped on a rerun."""

from __future__ import annotations

import math

import pytest

from gleaner.config import GleanerConfig
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from tests.support.openai_server import OpenAIStub, Reply, request_text


def scorer_endpoint(body):
    text = request_text(body)
    if "BROKEN" in text:
        return Reply(status=400)
    if "##Complexity" in text:
        return Reply(content="2", top_logprobs=[{"2": math.log(0.5), "4": math.log(0.5)}])
    return Reply(content="5", top_logprobs=[{"5": 0.0}])


@pytest.mark.slow  # Ray workers + Prefect API
def test_score_flow_on_ray_with_resume(ray_local, prefect_api, tmp_path):
    from gleaner.flows.deita_flow import run_score

    pool = [Example("unit", i, f"Task {i}" + (" BROKEN" if i == 7 else ""), output=f"Done {i}")
            for i in range(40)]
    store = Store(str(tmp_path / "store"))
    store.write_part("run", "ingest", 0, examples_to_table(pool))
    with OpenAIStub(scorer_endpoint) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": str(tmp_path / "store"), "score.backend": "endpoint",
            "score.endpoint": {"base_url": stub.base_url, "model": "deita-stub",
                               "max_retries": 0},
            "score.resources.batch_size": 16, "score.resources.retries": 0,
            "score.cache": False,
        })
        summary = run_score(store, "run", config)
        assert summary["scored"] == 39 and summary["failed"] == 1 and summary["examples"] == 40
        assert store.finished_parts("run", "score") == {0, 1, 2}
        rows = {r["id"]: r for r in store.read_stage("run", "score").to_pylist()}
        good = rows[pool[0].id]
        assert good["complexity"] == pytest.approx(3.0) and good["quality"] == pytest.approx(5.0)
        assert good["evol"] == pytest.approx(15.0) and good["status"] == "ok"
        bad = rows[pool[7].id]
        assert bad["status"] == "failed" and bad["evol"] is None and "http_error" in bad["error"]
        assert stub.count() == 1 + 80  # the probe, then complexity and quality of 40

        # Resume: only the lost batch is scored again.
        store.fs.rm(store.part_paths(store.stage_path("run", "score"))[1])
        stub.reset()
        again = run_score(store, "run", config)
        assert stub.count() == 1 + 2 * 16
        assert again["scored"] == 39 and store.finished_parts("run", "score") == {0, 1, 2}
