"""The Prefect UI shows a curate run as a person would see it, in headless Chromium.

After a `gleaner curate` run (tests/support/curate_run.py), Debian's chromium
opens the flow run's page of the Prefect UI served by the test's own
`prefect server start`, waits for the single-page app to render, opens the
Artifacts tab and then the counts artifact, and checks through the page that
the table a person reads shows the run's real counts. Screenshots are saved
(to $GLEANER_SCREENSHOT_DIR when set, else the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.browser import Chromium, chromium_binary
from tests.support.curate_run import cli_curate_run, in_ci
from tests.support.pipeline import flow_run_by_name

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.e2e,
              pytest.mark.timeout(900)]

TABLE_ROWS_JS = """
[...document.querySelectorAll('table tr')].map(
  tr => [...tr.querySelectorAll('th, td')].map(td => td.innerText.trim()))
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if chromium_binary() is None:
        if in_ci():
            pytest.fail("chromium is missing in CI: .ci/run must apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with Chromium(tmp_path_factory.mktemp("chromium") / "profile") as chromium:
        yield chromium


def keep_screenshot(chromium: Chromium, tmp_path: Path, name: str) -> Path:
    path = chromium.screenshot(tmp_path / name)
    target_dir = os.environ.get("GLEANER_SCREENSHOT_DIR")
    if target_dir:
        Path(target_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target_dir) / name)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank image
    return path


def test_flow_run_page_shows_the_run_and_its_counts_artifact(browser, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run = cli_curate_run(prefect_api)
    ui = prefect_api.removesuffix("/api")
    key = f"curate-{run.run_id}"
    with get_client(sync_client=True) as client:
        flow_run = flow_run_by_name(client, key)
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=5)

    # The flow run page: name, state, and the stage subflows' task runs on the timeline.
    browser.open(f"{ui}/runs/flow-run/{flow_run.id}")
    page = browser.wait_for_text(key, "Completed", "Artifacts", timeout_s=90)
    assert "Can't connect to Server API" not in page
    time.sleep(2)  # the run graph is drawn on a canvas after the text: let it settle
    keep_screenshot(browser, tmp_path, "flow-run.png")

    # The stages are subflow runs a person can open.
    assert browser.click_text("Subflow Runs")
    browser.wait_for_text(f"rate-{run.run_id}", f"score-{run.run_id}", timeout_s=60)
    keep_screenshot(browser, tmp_path, "flow-run-subflows.png")

    # Its Artifacts tab lists the counts artifact by key.
    assert browser.click_text("Artifacts")
    browser.wait_for_text(key, "where every example", timeout_s=60)
    keep_screenshot(browser, tmp_path, "flow-run-artifacts.png")

    # The artifact itself: the counts table a person reads first.
    browser.open(f"{ui}/artifacts/artifact/{artifact.id}")
    browser.wait_for_text("quarantined", "selected", timeout_s=90)
    keep_screenshot(browser, tmp_path, "counts-artifact.png")
    rows = {cells[0]: cells[1] for cells in browser.evaluate(TABLE_ROWS_JS) if len(cells) == 2}
    ingest, rate, select = run.summary["ingest"], run.summary["rate"], run.summary["select"]
    assert rows["read"] == f"{ingest['read']:,}"
    assert rows["quarantined"] == f"{ingest['quarantined']:,}"
    assert rows["rating failed"] == f"{rate['failed']:,}" == "1"
    assert rows["selected"] == f"{select['selected']:,}"
