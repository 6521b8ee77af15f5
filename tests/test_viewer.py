"""`gleaner view`'s API over a real small run (tests/support/viewer_run.py), in process.

Pages, filters, sort, search and an example's page against what the store holds; a
person's exclusion recorded (who, why) and honoured by the next selection (reason
``excluded``, left out of the curated set); the token off loopback and the Host check on
it; and no script in the page that could put data into the DOM as HTML.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.compute as pc
import pytest
from starlette.testclient import TestClient

from gleaner import layout
from tests.support.viewer_run import XSS, build_viewer_run

STATIC = Path(__file__).resolve().parents[1] / "flows" / "viewer" / "static"


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    return build_viewer_run(tmp_path_factory.mktemp("viewer"), shared_data)


@pytest.fixture()
def client(run):
    from gleaner.flows.viewer.server import create_app

    with TestClient(create_app(run.store, run.run_id, reviewer="tester"),
                    base_url="http://127.0.0.1:8765") as client:
        yield client


def manifest(run):
    return run.store.read_stage(run.run_id, layout.SELECT)


def test_pages_filters_sort_search_and_example(run, client):
    ingest = run.store.read_json(layout.summary_path(run.store, run.run_id, layout.INGEST))
    info = client.get("/api/run").json()
    assert info["examples"] == ingest["kept"] == 41
    assert {"rating", "status:rate", "reason", "selected", "excluded"} <= {
        f["name"] for f in info["fields"]}

    first = client.get("/api/pool", params={"limit": 10}).json()
    pool_ids = run.store.read_stage(run.run_id, layout.INGEST, columns=["id"])["id"].to_pylist()
    assert first["total"] == 41 and [r["id"] for r in first["rows"]] == pool_ids[:10]
    second = client.get("/api/pool", params={"limit": 10, "offset": 10}).json()
    assert [r["id"] for r in second["rows"]] == pool_ids[10:20]

    table = manifest(run)
    similar = table.filter(pc.starts_with(table["reason"], "too_similar"))["id"].to_pylist()
    page = client.get("/api/pool", params={"is": "reason,too_similar", "limit": 200}).json()
    assert similar and sorted(r["id"] for r in page["rows"]) == sorted(similar)
    assert all(r["stages"]["select"]["reason"].startswith("too_similar:") for r in page["rows"])

    failed = client.get("/api/pool", params={"is": "status:rate,failed"}).json()
    assert sorted(r["id"] for r in failed["rows"]) == sorted(run.failed_ids)
    assert all(r["stages"]["rate"]["error"].startswith("parse:") for r in failed["rows"])

    ranged = client.get("/api/pool", params=[("range", "rating,4,4.5"), ("sort", "rating"),
                                             ("desc", "1"), ("limit", "200")]).json()
    ratings = [r["fields"]["rating"] for r in ranged["rows"]]
    assert ratings == sorted(ratings, reverse=True) and set(ratings) <= {4.0, 4.5}
    rate = run.store.read_stage(run.run_id, layout.RATE)
    assert ranged["total"] == pc.sum(pc.and_(pc.greater_equal(rate["score"], 4),
                                             pc.less_equal(rate["score"], 4.5))).as_py()
    selected = client.get("/api/pool", params={"is": "selected,true"}).json()
    assert selected["total"] == pc.sum(table["selected"]).as_py() == 12

    found = client.get("/api/pool", params={"q": "SUMMARISE THIS"}).json()
    assert [r["id"] for r in found["rows"]] == [run.xss_id]
    assert found["rows"][0]["instruction"] == XSS  # as stored: the page renders it as text

    rated_id = next(iter(run.raw))
    example = client.get(f"/api/example/{rated_id}").json()
    assert example["stages"]["rate"]["raw"] == run.raw[rated_id]
    assert example["conversation"][-1]["role"] == "assistant"
    assert client.get("/api/example/nope").status_code == 404
    assert client.get("/api/pool", params={"range": "nosuch,1,2"}).status_code == 400


def test_counts_and_evaluation(run, client):
    counts = client.get("/api/counts").json()
    summaries = counts["summaries"]
    assert summaries["ingest"]["read"] == 43 and summaries["select"]["selected"] == 12
    assert sum(counts["histograms"]["rating"]["pool"]) == 39  # the rated-ok examples
    assert sum(counts["histograms"]["rating"]["selected"]) == 12
    assert "evaluate/curated-vs-baseline/judge/vicuna" not in summaries  # none written here

    evaluation = client.get("/api/evaluation").json()
    (comparison,) = evaluation["comparisons"]
    assert comparison["test_sets"]["vicuna"]["win"] == 2
    pairs = client.get("/api/evaluation/curated-vs-baseline/vicuna").json()
    assert pairs["total"] == 4 and pairs["counts"] == {"lose": 1, "tie": 1, "win": 2}
    first = pairs["rows"][0]
    assert first["review_a_first"].startswith("8 6") and first["review_b_first"]
    assert first["answer_a"] and first["answer_b"] and first["verdict"] == "win"
    lost = client.get("/api/evaluation/curated-vs-baseline/vicuna",
                      params={"verdict": "lose"}).json()
    assert [p["key"] for p in lost["rows"]] == ["q2"]


def test_an_exclusion_is_recorded_and_the_next_selection_honours_it(run, client):
    from gleaner.flows.viewer.pool import exclusion_records
    from gleaner.tasks.select.stage import select_examples

    table = manifest(run)
    kept = table.filter(table["selected"])["id"].to_pylist()
    target, flagged = kept[0], kept[1]
    refused = client.post("/api/review", json={"ids": [target], "action": "exclude"})
    assert refused.status_code == 403  # no X-Gleaner header: what a cross-site form sends
    answer = client.post("/api/review", headers={"X-Gleaner": "1"},
                         json={"ids": [target], "action": "exclude", "why": "wrong answer",
                               "who": "ana"})
    assert answer.status_code == 200, answer.text
    client.post("/api/review", headers={"X-Gleaner": "1"},
                json={"ids": [flagged], "action": "flag", "why": "check the maths"})
    assert client.post("/api/review", headers={"X-Gleaner": "1"},
                       json={"ids": ["not-an-id"], "action": "exclude"}).status_code == 400

    (record,) = exclusion_records(run.store, run.run_id)
    assert (record["id"], record["who"], record["why"]) == (target, "ana", "wrong answer")
    page = client.get("/api/pool", params={"is": "excluded,true"}).json()
    assert [r["id"] for r in page["rows"]] == [target]
    flagged_page = client.get("/api/pool", params={"is": "flagged,true"}).json()
    assert [r["id"] for r in flagged_page["rows"]] == [flagged]
    example = client.get(f"/api/example/{flagged}").json()
    assert example["review"][0]["who"] == "tester"  # the server's reviewer when none given

    summary, _, _ = select_examples(run.store, run.run_id, run.config)
    after = manifest(run)
    reasons = dict(zip(after["id"].to_pylist(), after["reason"].to_pylist(), strict=True))
    assert reasons[target] == "excluded" and summary["reasons"]["excluded"] == 1
    assert reasons[flagged] == "kept"  # a flag is a note, not an exclusion
    curated = run.store.read_stage(run.run_id, layout.CURATED, columns=["id"])["id"].to_pylist()
    assert target not in curated and len(curated) == 12  # the budget is filled by another

    client.post("/api/review", headers={"X-Gleaner": "1"},
                json={"ids": [target], "action": "include", "why": "fine after all"})
    assert exclusion_records(run.store, run.run_id) == []
    select_examples(run.store, run.run_id, run.config)
    assert manifest(run).filter(pc.equal(manifest(run)["id"], target))["reason"][0].as_py() \
        == "kept"


def test_token_off_loopback_and_host_check_on_it(run):
    from gleaner.flows.viewer.server import create_app, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    app = create_app(run.store, run.run_id, token="s3cret-token", loopback=False)
    with TestClient(app, base_url="http://10.1.2.3:8765") as remote:
        assert remote.get("/").status_code == 200  # the page itself holds no data: it asks
        assert remote.get("/api/run").status_code == 401
        assert remote.get("/api/pool").status_code == 401
        assert remote.get("/api/run", headers={"X-Gleaner-Token": "wrong"}).status_code == 401
        assert remote.get("/api/run", headers={"X-Gleaner-Token": "s3cret-token"}).status_code \
            == 200
        assert remote.get("/api/pool", params={"token": "s3cret-token"}).status_code == 200
    local = create_app(run.store, run.run_id)
    with TestClient(local, base_url="http://evil.example:8765") as rebound:
        assert rebound.get("/api/run").status_code == 403  # DNS rebinding onto loopback
    with TestClient(local, base_url="http://localhost:8765") as ok:
        answer = ok.get("/")
        assert answer.status_code == 200
        assert "script-src 'self'" in answer.headers["content-security-policy"]


def test_the_page_never_parses_data_as_html():
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "srcdoc"):
        assert sink not in script, sink
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script>(?!\s*</script>)", html)  # no inline script (CSP forbids it)


def test_flow_run_links_come_from_the_prefect_api(prefect_api):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    from gleaner.flows.viewer.server import prefect_flow_runs

    @flow(name="viewer-links")
    def noop() -> None:
        return None

    run_id = "viewer-links-run"
    with get_client(sync_client=True) as client:
        made = client.create_flow_run(noop, name=f"rate-{run_id}")
        client.create_flow_run(noop, name="rate-another-run")
    found = asyncio.run(prefect_flow_runs(prefect_api, None, run_id))
    assert [r["name"] for r in found["runs"]] == [f"rate-{run_id}"]
    ui = prefect_api.removesuffix("/api")
    assert found["runs"][0]["url"] == f"{ui}/runs/flow-run/{made.id}"
    unreachable = asyncio.run(prefect_flow_runs("http://127.0.0.1:9/api", None, run_id))
    assert unreachable["runs"] == [] and "Prefect API" in unreachable["error"]
