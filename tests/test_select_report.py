"""The selection report: counts add up, histograms count what they should, the PNG is real,
and the similarity threshold's effect is measured against the plain top-k."""

from __future__ import annotations

import numpy as np

from gleaner.store import Store
from gleaner.tasks.select.report import build_report, histogram, write_report
from gleaner.tasks.select.selectors import select_deita


def test_report_counts_histograms_and_similarity_effect(tmp_path):
    ids = [f"e{i:02d}" for i in range(12)]
    base = np.eye(12, dtype=np.float32)
    base[1] = base[0]  # e01 duplicates e00 (scores make e00 first)
    base[3] = base[2]
    evol = np.array([30, 29, 28, 27, 26, 25, 24, 23, 22, 21, np.nan, 5.0])
    manifest = select_deita(ids, evol, base, budget=5, tau=0.9)
    assert manifest.selected_ids == ["e00", "e02", "e04", "e05", "e06"]
    columns = {"evol": evol, "complexity": np.sqrt(evol),
               "rating": np.array([5, 4.5, 4, 3.5, 5, 5, 2, 1, 0, 4.5, np.nan, 3])}
    report = build_report(manifest, columns, {"selector": "deita", "size": 5, "tau": 0.9},
                          tau=0.9)
    assert report.counts == {"kept": 5, "below_threshold": 0, "above_threshold": 0,
                             "too_similar": 2, "over_budget": 4, "failed_upstream": 1,
                             "contaminated": 0, "near_duplicate": 0}
    sim = report.similarity
    # Without the threshold the top 5 would be e00..e04; e01 and e03 were displaced.
    assert sim == {"too_similar": 2, "displaced_from_top": 2,
                   "selected_with_similar_rejected": 2, "walked_rows": 7}
    assert report.histograms["evol"]["pool"]["n"] == 11
    assert sum(report.histograms["evol"]["selected"]["counts"]) == 5
    assert sum(report.histograms["rating"]["pool"]["counts"]) == 11
    assert "| too_similar | 2 |" in report.markdown and "| **total** | **12** |" in report.markdown
    assert "2 rejected as too similar" in report.markdown
    assert report.figure[:8] == b"\x89PNG\r\n\x1a\n"

    store = Store(str(tmp_path / "store"))
    paths = write_report(store, "r1", report)
    assert store.read_json(paths["json"])["counts"] == report.counts
    assert store.read_bytes(paths["figure"]) == report.figure
    assert store.read_bytes(paths["markdown"]).decode() == report.markdown


def test_histogram_clips_to_the_edge_bins():
    h = histogram(np.array([0.0, 0.2, 5.0, 7.0, np.nan]), np.array([0.0, 2.5, 5.0]))
    assert h == {"edges": [0.0, 2.5, 5.0], "counts": [2, 2], "n": 4}
