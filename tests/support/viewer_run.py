"""A small real run for the viewer's tests, made without Prefect or an LLM in a few seconds.

Real Alpaca records (../shared/data) go through the real ingest (a quarantined record and
a duplicate included, and one whose instruction is an HTML/script injection); the rating
stage's parts are written with the stage's own schema (RATING_SCHEMA: scores, the rater's
raw answers, two failed rows with their errors) and its summary with the stage's own
summarize(); embeddings are written with embed's schema, in near-identical groups, so that
the real DEITA selection walk rejects some examples as ``too_similar``; a pairwise
evaluation's judge stage and summary are written with JUDGEMENT_SCHEMA.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.stage import rows_table
from gleaner.store import Store

XSS = ("<img src=x onerror=\"document.title='x'\"> Summarise this <script>"
       "document.title='x'</script> text")
RUN_ID = "view-run"
RECORDS = 40


@dataclass
class ViewerRun:
    store: Store
    url: str
    run_id: str
    config: GleanerConfig
    xss_id: str
    failed_ids: list[str]
    raw: dict[str, str]  # the rater's raw answer per rated example


def raw_answer(i: int, score: float) -> str:
    return (f"Rater note {i}: the response is relevant and mostly accurate, "
            f"<b>not bold</b> & fine.\nScore: {score}")


def build_viewer_run(root: Path, shared_data: Path, run_id: str = RUN_ID) -> ViewerRun:
    from gleaner.tasks.deita.embed import embed_schema
    from gleaner.tasks.evaluate.stage import JUDGEMENT_SCHEMA
    from gleaner.tasks.ingest.ingest import run_ingest
    from gleaner.tasks.rate.stage import RATING_SCHEMA, histogram
    from gleaner.tasks.select.stage import select_examples

    records = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())
    rows: list[dict[str, Any]] = [dict(r) for r in records[:RECORDS]]
    rows.append({"instruction": XSS, "input": "<b>input</b>", "output": "<i>answer</i>"})
    rows.append(dict(records[3]))  # a duplicate
    rows.append({"instruction": "An example with no response", "input": "", "output": ""})
    source = root / "pool.json"
    source.write_text(json.dumps(rows))

    url = str(root / "store")
    config = GleanerConfig().with_overrides({
        "store.url": url, "select.selector": "deita", "select.sort_by": "rating",
        "select.size": 12, "select.tau": 0.9})
    store = Store(url)
    run_ingest([str(source)], store, run_id, config)

    pool = store.read_stage(run_id, layout.INGEST, columns=["id", "instruction"])
    ids = pool["id"].to_pylist()
    xss_id = ids[pool["instruction"].to_pylist().index(XSS)]
    rng = np.random.default_rng(7)
    rated, raw = [], {}
    failed_ids = [ids[5], ids[9]]
    for i, example_id in enumerate(ids):
        if example_id in failed_ids:
            rated.append({"id": example_id, "dimension": "accuracy", "model": "stub-rater",
                          "prompt_version": "v1", "mode": "explain", "score": None,
                          "raw": "I cannot rate this.", "status": "failed",
                          "error": f"parse: no score in the answer (example {i})",
                          "error_kind": "parse", "attempts": 3})
            continue
        score = float(rng.choice([2.0, 3.0, 3.5, 4.0, 4.5, 5.0]))
        raw[example_id] = raw_answer(i, score)
        rated.append({"id": example_id, "dimension": "accuracy", "model": "stub-rater",
                      "prompt_version": "v1", "mode": "explain", "score": score,
                      "raw": raw[example_id], "status": "ok", "attempts": 1,
                      "prompt_tokens": 100, "completion_tokens": 20})
    table = rows_table(rated, RATING_SCHEMA)
    store.write_part(run_id, layout.RATE, 0, table.slice(0, 20))
    store.write_part(run_id, layout.RATE, 1, table.slice(20))
    ok_scores = [r["score"] for r in rated if r["status"] == "ok"]
    kept = sum(s >= 4.5 for s in ok_scores)
    store.write_json(layout.summary_path(store, run_id, layout.RATE), {
        "run_id": run_id, "stage": layout.RATE, "examples": len(rated), "ok": len(ok_scores),
        "failed": len(failed_ids), "cached": 0, "read": len(rated), "rated": len(ok_scores),
        "kept": kept, "below": len(ok_scores) - kept, "threshold": 4.5,
        "histogram": histogram(ok_scores), "failures": {"parse": len(failed_ids)}})

    # Embeddings in groups of three near-identical vectors: the walk keeps one of each group
    # it reaches and rejects the others as too similar.
    dim = 16
    base = rng.normal(size=(len(ids) // 3 + 1, dim))
    vectors = np.array([base[i // 3] + 0.01 * rng.normal(size=dim) for i in range(len(ids))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embed = rows_table([{"id": example_id, "model": "stub-embedder", "vector": v.tolist(),
                         "status": "ok"} for example_id, v in zip(ids, vectors, strict=True)],
                       embed_schema(dim))
    store.write_part(run_id, layout.EMBED, 0, embed)
    select_examples(store, run_id, config)

    comparison, test_set = "curated-vs-baseline", "vicuna"
    judged = []
    for i, outcome in enumerate(["win", "tie", "lose", "win"]):
        judged.append({
            "id": f"pair-{i}", "test_set": test_set, "key": f"q{i}", "question": f"Question {i}?",
            "answer_a": f"Curated answer {i} <b>A</b>", "answer_b": f"Baseline answer {i}",
            "a_first_score_1": 8.0, "a_first_score_2": 6.0, "b_first_score_1": 6.0,
            "b_first_score_2": 8.0, "outcome_a_first": outcome, "outcome_b_first": outcome,
            "review_a_first": f"8 6\nReview {i} with A shown first.",
            "review_b_first": f"6 8\nReview {i} with B shown first.",
            "judge_model": "stub-judge", "status": "ok"})
    store.write_part(run_id, layout.judge_stage(comparison, test_set), 0,
                     rows_table(judged, JUDGEMENT_SCHEMA))
    tallies = {"win": 2, "tie": 1, "lose": 1, "failed": 0, "judged": 4, "winning_score": 1.25,
               "win_rate": 0.625, "lc_win_rate": None}
    store.write_json(posixpath.join(layout.comparison_dir(store, run_id, comparison),
                                    "summary.json"),
                     {"run_id": run_id, "comparison": comparison, "model_a": "curated",
                      "model_b": "baseline", "rule": "alpagasus", "judge_model": "stub-judge",
                      "test_sets": {test_set: tallies}, "overall": tallies})
    return ViewerRun(store, url, run_id, config, xss_id, failed_ids, raw)
