"""`gleaner view` in headless Chromium over a real run (tests/support/viewer_run.py).

The viewer is started as a person starts it (the `gleaner view` command, a child process);
Chromium (Debian's, over the DevTools protocol: tests/support/browser.py) opens its page.
The counts on the page equal the stages' summaries; the reason filter, set in the page's
form, shows exactly the manifest's ``too_similar`` rows; an example's page shows the
rater's raw answer; a pool row whose instruction holds an ``<img onerror>`` and a
``<script>`` shows them as text and runs nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pytest

from gleaner import layout
from tests.support.browser import Chromium, chromium_binary
from tests.support.curate_run import in_ci
from tests.support.viewer_run import XSS, build_viewer_run

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ROW_IDS_JS = "[...document.querySelectorAll('#pool tbody tr[data-id]')].map(tr => tr.dataset.id)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, shared_data):
    if chromium_binary() is None:
        if in_ci():
            pytest.fail("chromium is missing in CI: .ci/run must apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    folder = tmp_path_factory.mktemp("viewer-browser")
    run = build_viewer_run(folder, shared_data)
    port = free_port()
    gleaner = str(Path(sys.executable).parent / "gleaner")
    server = subprocess.Popen([gleaner, "view", "--run-id", run.run_id, "--store", run.url,
                               "--port", str(port), "--reviewer", "browser-test"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"gleaner view exited: {server.stdout.read()}")
            try:
                httpx.get(url + "api/run", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with Chromium(folder / "chromium") as browser:
            yield run, url, browser
    finally:
        server.terminate()
        server.wait(timeout=30)


def open_view(browser: Chromium, url: str, *needles: str) -> str:
    browser.open(url)
    return browser.wait_for_text(*needles, timeout_s=30)


def test_counts_on_the_page_equal_the_summaries(viewer):
    run, url, browser = viewer
    open_view(browser, url + "#/counts", "read = kept + quarantined + duplicates", "selection")
    summaries = {stage: run.store.read_json(layout.summary_path(run.store, run.run_id, stage))
                 for stage in (layout.INGEST, layout.RATE, layout.SELECT)}
    cells = browser.evaluate("Object.fromEntries([...document.querySelectorAll('td[id]')]"
                             ".map(td => [td.id, td.textContent]))")
    ingest, rate, select = summaries["ingest"], summaries["rate"], summaries["select"]
    for key in ("read", "kept", "quarantined", "duplicates"):
        assert cells[f"ingest-{key}"] == f"{ingest[key]:,}"
    assert int(cells["ingest-read"]) == sum(int(cells[f"ingest-{k}"])
                                            for k in ("kept", "quarantined", "duplicates"))
    assert cells["rate-examples"] == f"{rate['examples']:,}"
    for key in ("kept", "below", "failed"):
        assert cells[f"rate-{key}"] == f"{rate[key]:,}"
    assert cells["select-selected"] == f"{select['selected']:,}"
    for reason, count in select["reasons"].items():
        assert cells[f"select-{reason}"] == f"{count:,}", reason
    histogram = browser.evaluate("[...document.querySelectorAll('#rate-histogram tr')]"
                                 ".map(tr => [...tr.children].map(td => td.textContent))")
    assert {row[0]: int(row[1]) for row in histogram} == rate["histogram"]


def test_the_reason_filter_shows_exactly_the_manifests_rows(viewer):
    run, url, browser = viewer
    open_view(browser, url + "#/pool", "matching examples")
    browser.evaluate("""(() => {
        const select = document.querySelector('#filters select[data-field="reason"]');
        select.value = 'too_similar';
        document.querySelector('#filters select[name="limit"]').value = '200';
        document.getElementById('apply').click();
    })()""")
    manifest = run.store.read_stage(run.run_id, layout.SELECT)
    similar = manifest.filter(pc.starts_with(manifest["reason"], "too_similar:"))
    expected = similar["id"].to_pylist()
    text = browser.wait_for_text(f"{len(expected)} matching examples", timeout_s=30)
    assert "is=reason%2Ctoo_similar" in browser.evaluate("location.hash")
    assert sorted(browser.evaluate(ROW_IDS_JS)) == sorted(expected)
    reasons = browser.evaluate("[...document.querySelectorAll('#pool td.reason')]"
                               ".map(td => td.textContent)")
    assert len(reasons) == len(expected) and all(r.startswith("too_similar:") for r in reasons)
    assert "failed to fetch" not in text.lower()


def test_an_examples_page_shows_its_raters_raw_answer(viewer):
    run, url, browser = viewer
    example_id, raw = next(iter(run.raw.items()))
    open_view(browser, url + f"#/example/{example_id}", "review", "raw")
    shown = browser.evaluate("document.querySelector('#stage-rate').textContent")
    assert raw in shown  # with its <b> and & as the rater wrote them, as text
    assert browser.evaluate("document.querySelectorAll('#stage-rate b').length") == 0


def test_markup_in_an_example_is_shown_as_text_and_runs_nothing(viewer):
    run, url, browser = viewer
    for view in ("#/pool?limit=200", "#/pool?q=summarise", f"#/example/{run.xss_id}"):
        browser.open("about:blank")
        open_view(browser, url + view, "Summarise this")
        time.sleep(1.0)  # time for an <img onerror> to have fired, were it an element
        assert browser.evaluate("document.title") == "gleaner view", view
        assert browser.evaluate("document.querySelectorAll('main img, main script, "
                                "main b, main i').length") == 0, view
        texts = browser.evaluate("[...document.querySelectorAll('main *')]"
                                 ".map(e => e.textContent)")
        assert any(XSS in text for text in texts), view
    body = browser.evaluate("document.querySelector('#instruction').textContent")
    assert body == XSS  # the example's page, opened last
    assert json.dumps(browser.console).count("document.title") == 0
