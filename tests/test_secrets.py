"""A distinctive API key goes into `gleaner curate`; afterwards it is nowhere it was not sent.

The key is in the CLI's environment (named by `api_key_env`); the loopback LLM
server confirms every request carried it, and twice echoes it back in an error
message (a 500 that is retried, a 400 that fails one example for good), as
real servers do. Then everything the run left behind is searched for it: the
whole store (Parquet decoded), run.json, the CLI's output, and what Prefect
keeps (flow runs, task runs, logs, artifacts, events). The deployment path
(a Prefect Secret block resolved by the worker) is checked in
tests/test_deployments.py.
"""

from __future__ import annotations

import pytest

from gleaner.runs import read_run
from gleaner.store import Store
from tests.support.curate_run import KEY_ENV, cli_curate_run
from tests.support.pipeline import (
    flow_run_by_name,
    leaks,
    prefect_record_texts,
    run_tree,
    store_texts,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def run(prefect_api):
    return cli_curate_run(prefect_api)


def test_the_key_was_used_and_echoed_back(run):
    assert run.authorizations == {f"Bearer {run.key}"}
    assert run.injected == {"500": 1, "400": 1}
    rate = run.summary["rate"]
    assert rate["failed"] == 1  # the 400 example: failed with its error, not lost
    ingest = run.summary["ingest"]
    assert rate["rated"] + rate["failed"] == ingest["kept"]


def test_the_key_is_in_no_store_file_output_or_prefect_record(run, prefect_api):
    from prefect.client.orchestration import get_client

    kept = store_texts(run.store)
    assert any(name.endswith("run.json") for name in kept)
    assert any(name.endswith(".parquet") for name in kept)
    kept["cli stdout"] = run.stdout
    kept["cli stderr"] = run.stderr
    home = run.workdir / "gleaner-home"
    if home.exists():
        kept.update({str(p): p.read_text(errors="replace") for p in home.rglob("*") if p.is_file()})
    with get_client(sync_client=True) as client:
        tree = run_tree(client, flow_run_by_name(client, f"curate-{run.run_id}").id)
        assert len(tree) >= 3  # curate and its stage subflows
        kept.update(prefect_record_texts(client, prefect_api, tree))
    assert leaks(run.key, kept) == []


def test_the_failed_example_keeps_a_scrubbed_error(run):
    """The 400's message echoed the key: the stored error says what happened, without it."""
    store = Store(str(run.store))
    ratings = store.read_stage(run.run_id, "rate").to_pylist()
    failed = [row for row in ratings if row.get("error")]
    assert len(failed) == 1
    error = failed[0]["error"]
    assert "400" in error and run.key not in error and run.key[-12:] not in error
    record = read_run(store, run.run_id)
    assert KEY_ENV in str(record["config"])  # the config names the variable, never its value
    assert run.key not in str(record)
