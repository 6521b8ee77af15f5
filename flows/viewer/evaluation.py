"""A run's evaluations for the viewer: W/T/L per test set, and each prompt's two answers with
both reviews and the verdict; the grid's arms, each pointing at its comparison."""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow.compute as pc

from gleaner import layout
from gleaner.store import Store

PAIR_COLUMNS = ("id", "test_set", "key", "question", "answer_a", "answer_b", "a_first_score_1",
                "a_first_score_2", "b_first_score_1", "b_first_score_2", "outcome_a_first",
                "outcome_b_first", "review_a_first", "review_b_first", "judge_model", "status",
                "error")


def comparisons(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every pairwise evaluation of the run (the grid's arms' included)."""
    from gleaner.tasks.evaluate.run import stored_comparisons

    return [{"comparison": name, "model_a": summary.get("model_a"),
             "model_b": summary.get("model_b"), "rule": summary.get("rule"),
             "judge_model": summary.get("judge_model"),
             "test_sets": summary.get("test_sets", {}), "overall": summary.get("overall", {})}
            for name, summary in stored_comparisons(store, run_id).items()]


def arms(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The grid's arms (``experiment/<name>/arms/<arm>.json``): size, W/T/L, comparison."""
    base = store.run_path(run_id, "experiment")
    try:
        paths = store.fs.glob(posixpath.join(base, "*", "arms", "*.json"))
    except FileNotFoundError:
        return []
    out = []
    for path in sorted(paths):
        record = store.read_json(path)
        evaluation = record.get("evaluation") or {}
        out.append({"experiment": posixpath.basename(posixpath.dirname(posixpath.dirname(path))),
                    "arm": record.get("arm"), "status": record.get("status"),
                    "selection": record.get("selection"), "examples": record.get("examples"),
                    "model": record.get("model"), "comparison": evaluation.get("comparison"),
                    "overall": evaluation.get("overall"),
                    "test_sets": evaluation.get("test_sets")})
    return out


def pairs(store: Store, run_id: str, comparison: str, test_set: str, offset: int = 0,
          limit: int = 20, outcome: str | None = None) -> dict[str, Any]:
    """One page of a test set's judged pairs: both answers, both reviews, the verdict."""
    from gleaner.tasks.evaluate.verdicts import verdict

    summary_path = posixpath.join(layout.comparison_dir(store, run_id, comparison),
                                  "summary.json")
    summary = store.read_json(summary_path) if store.exists(summary_path) else {}
    rule = summary.get("rule", "alpagasus")
    stage = layout.judge_stage(comparison, test_set)
    if not store.has_stage(run_id, stage):
        raise FileNotFoundError(f"no judgements for {comparison}/{test_set} in run {run_id!r}")
    table = store.read_stage(run_id, stage)  # a test set: hundreds of rows, not a pool
    table = table.select([c for c in PAIR_COLUMNS if c in table.column_names])
    verdicts = [verdict(a, b, rule) for a, b in zip(table["outcome_a_first"].to_pylist(),
                                                    table["outcome_b_first"].to_pylist(),
                                                    strict=True)]
    rows = table.to_pylist()
    for row, said in zip(rows, verdicts, strict=True):
        row["verdict"] = said
    if outcome:
        rows = [row for row in rows if row["verdict"] == outcome]
    rows.sort(key=lambda row: (row.get("key") or "", row["id"]))
    counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
    statuses = pc.value_counts(table["status"]).to_pylist() if "status" in table.column_names \
        else []
    return {"comparison": comparison, "test_set": test_set, "rule": rule,
            "model_a": summary.get("model_a"), "model_b": summary.get("model_b"),
            "total": len(rows), "offset": offset, "counts": counts,
            "status": {str(s["values"]): s["counts"] for s in statuses},
            "rows": rows[offset:offset + max(1, min(limit, 100))]}
