"""End to end on the real Alpaca 9k file: the real ingest, precomputed ratings and DEITA
scores for every example, real all-MiniLM-L6-v2 embeddings of a subset (the rest have none,
so they must come out ``failed_upstream``), then ``gleaner select`` through the CLI. The
manifest must account for every example, and the deita walk on the real vectors must equal
the sequential definition. (The Ray actor pool path is tested in test_embed.py; embedding
all 9,229 there takes minutes on two shared cores.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from gleaner.config import GleanerConfig
from gleaner.engine import rows_table
from gleaner.store import Store
from gleaner.tasks.deita.embed import Encoder, example_text, table_vectors, vectors_table
from gleaner.tasks.deita.stages import SCORE_SCHEMA
from gleaner.tasks.rate.stage import RATING_SCHEMA
from tests.test_select import reference_deita

RUN = "e2e-alpaca"
EMBEDDED = 2500  # examples that get a real embedding


def unit_hash(example_id: str, salt: str) -> float:
    """A deterministic pseudo-random number in [0, 1) per (example, salt)."""
    digest = hashlib.sha256(f"{salt}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def precomputed_scores(ids: list[str]) -> pa.Table:
    """Synthetic but deterministic DEITA scores; every 97th example failed to score."""
    rows = []
    for i, example_id in enumerate(ids):
        if i % 97 == 0:
            rows.append({"id": example_id, "turns": 1, "complexity_model": "synthetic",
                         "quality_model": "synthetic", "status": "failed",
                         "error": "synthetic failure"})
            continue
        c = 1 + 5 * unit_hash(example_id, "c")
        q = 1 + 5 * unit_hash(example_id, "q")
        if i % 50 == 1:  # ties in s, broken by id
            c, q = 3.0, 4.0
        rows.append({"id": example_id, "complexity": c, "quality": q, "evol": c * q, "turns": 1,
                     "complexity_turns": [c], "quality_turns": [q],
                     "complexity_model": "synthetic", "quality_model": "synthetic",
                     "status": "ok", "error": None})
    return rows_table(rows, SCORE_SCHEMA)


def precomputed_ratings(ids: list[str]) -> pa.Table:
    """AlpaGasus-like ratings in 0.5 steps; every 131st example's rating failed."""
    rows = []
    for i, example_id in enumerate(ids):
        ok = i % 131 != 0
        score = min(5.0, 2.0 + round(unit_hash(example_id, "r") * 7) / 2) if ok else None
        rows.append({"id": example_id, "dimension": "accuracy", "model": "synthetic",
                     "prompt_version": "v", "mode": "explain", "score": score,
                     "status": "ok" if ok else "failed", "raw": None, "attempts": 1,
                     "error": None if ok else "parse", "error_kind": None if ok else "parse",
                     "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": 0.0,
                     "cached": False})
    return pa.Table.from_pylist(rows, schema=RATING_SCHEMA)


@pytest.mark.slow  # embeds 2,500 real examples with MiniLM (~30 s on two shared cores)
@pytest.mark.e2e
def test_select_on_alpaca_9k(shared_data, tmp_path, prefect_api):
    from gleaner.flows.cli import app
    from gleaner.tasks.ingest.ingest import run_ingest

    store_url = str(tmp_path / "store")
    store = Store(store_url)
    config = GleanerConfig().with_overrides({"store.url": store_url})
    source = str(shared_data / "alpaca" / "alpaca_random_9k.json")
    ingest = run_ingest([source], store, RUN, config)
    assert ingest["read"] == 9229
    ids = store.read_stage(RUN, "ingest", columns=["id"]).column("id").to_pylist()
    assert len(ids) == ingest["kept"]
    store.write_part(RUN, "score", 0, precomputed_scores(ids))
    store.write_part(RUN, "rate", 0, precomputed_ratings(ids))

    examples = store.read_stage(RUN, "ingest", columns=["id", "conversation"]).to_pylist()
    subset = examples[:: len(examples) // EMBEDDED][:EMBEDDED]
    encoder = Encoder(max_length=64, batch_size=64)
    vectors = encoder.encode([example_text(r) for r in subset])
    store.write_part(RUN, "embed", 0, vectors_table([r["id"] for r in subset], encoder.name,
                                                    vectors))
    has_vector = {r["id"] for r in subset}

    out = tmp_path / "curated.json"
    runner = CliRunner()
    result = runner.invoke(app, [
        "select", "--run-id", RUN, "--store", store_url, "--selector", "deita",
        "--budget", "400", "--tau", "0.8", "--threshold", "4.5",
        "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    reasons = summary["reasons"]
    assert sum(reasons.values()) == len(ids) == summary["examples"]
    assert summary["selected"] == reasons["kept"] == 400

    manifest = store.read_stage(RUN, "select")
    assert manifest.num_rows == len(ids)
    assert sorted(manifest.column("id").to_pylist()) == sorted(ids)
    rows = {r["id"]: r for r in manifest.to_pylist()}
    ratings = {r["id"]: r for r in precomputed_ratings(ids).to_pylist()}
    scores = {r["id"]: r for r in precomputed_scores(ids).to_pylist()}
    for example_id, row in rows.items():
        rating, score = ratings[example_id], scores[example_id]
        if rating["status"] != "ok":
            assert row["reason"] == "failed_upstream"
        elif rating["score"] < 4.5:
            assert row["reason"] == "below_threshold"
        elif score["status"] != "ok" or example_id not in has_vector:
            assert row["reason"] == "failed_upstream"
        else:
            assert row["reason"] in ("kept", "over_budget") or row["reason"].startswith(
                "too_similar:")
            assert row["score"] == pytest.approx(score["evol"])
    assert reasons["too_similar"] > 0, reasons  # real near-duplicates above tau

    # The walk on the real vectors equals the sequential definition.
    passed = [i for i in ids if ratings[i]["status"] == "ok" and ratings[i]["score"] >= 4.5]
    vec_ids, stored = table_vectors(store.read_stage(RUN, "embed"))
    by_id = dict(zip(vec_ids, stored, strict=True))
    evol = [scores[i]["evol"] if scores[i]["status"] == "ok" and i in by_id else np.nan
            for i in passed]
    zero = np.zeros(stored.shape[1], dtype=np.float32)
    want_ids, want_reasons = reference_deita(
        passed, evol, np.stack([by_id.get(i, zero) for i in passed]), 400, 0.8)
    chosen = [r for r in rows.values() if r["selected"]]
    assert [r["id"] for r in sorted(chosen, key=lambda r: r["rank"])] == want_ids
    assert [rows[i]["reason"] for i in passed] == want_reasons

    # The curated dataset (store and --out) holds exactly the selected examples, in order.
    curated = store.read_stage(RUN, "curated")
    assert curated.column("id").to_pylist() == want_ids
    exported = json.loads(out.read_text())
    assert len(exported) == 400 and set(exported[0]) >= {"instruction", "input", "output"}
    report = store.read_json(store.run_path(RUN, "report", "select-report.json"))
    assert report["counts"] == reasons
    assert report["similarity"]["too_similar"] == reasons["too_similar"]
    png = store.read_bytes(store.run_path(RUN, "report", "scores.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # A same-size random baseline (seeded) and AlpaGasus' plain threshold, on the same run.
    result = runner.invoke(app, [
        "select", "--run-id", RUN, "--store", store_url, "--selector", "random", "--force",
        "--budget", "400", "--seed", "3", "--json",
    ])
    assert result.exit_code == 0, result.output
    random_summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert random_summary["selected"] == 400
    assert sum(random_summary["reasons"].values()) == len(ids)
    result = runner.invoke(app, [
        "select", "--run-id", RUN, "--store", store_url, "--selector", "threshold", "--force",
        "--threshold", "4.5", "--json",
    ])
    threshold_summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert threshold_summary["selected"] == len(passed)
    assert threshold_summary["reasons"]["failed_upstream"] == sum(
        1 for r in ratings.values() if r["status"] != "ok")
