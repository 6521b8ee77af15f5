"""Near-duplicate removal: ``gleaner neardup`` on 20,000 examples (every real record of
../shared/data's Alpaca, Alpaca-GPT4 and Dolly samples, plus edited copies of them: a word
replaced, dropped or added here and there, so that pairs fall on both sides of the
threshold) against an exact all-pairs Jaccard of the same shingle sets (an AllPairs prefix
filter, then every candidate's sets compared: exact, not sampled); every cluster keeps its
longest response; a run whose parts were partly lost resumes them and clusters the same."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gleaner.tasks.decontam.neardup import candidate_pairs, keepers, shingles, text_of

THRESHOLD = 0.8
SHINGLE = 3


def exact_pairs(sets: list[frozenset[bytes]], threshold: float) -> set[tuple[int, int]]:
    """Every pair with Jaccard >= threshold (AllPairs: a pair that reaches it shares a token
    of both prefixes under one global order, so checking those candidates finds them all)."""
    frequency: dict[bytes, int] = defaultdict(int)
    for s in sets:
        for token in s:
            frequency[token] += 1
    rank = {t: (f, t) for t, f in frequency.items()}
    index: dict[bytes, list[int]] = defaultdict(list)
    found: set[tuple[int, int]] = set()
    for i in sorted(range(len(sets)), key=lambda i: len(sets[i])):
        x = sets[i]
        if not x:
            continue
        ordered = sorted(x, key=rank.__getitem__)
        prefix = len(x) - math.ceil(threshold * len(x) - 1e-9) + 1
        seen: set[int] = set()
        for token in ordered[:prefix]:
            for j in index[token]:
                if j in seen:
                    continue
                seen.add(j)
                y = sets[j]
                overlap = len(x & y)
                if overlap / (len(x) + len(y) - overlap) >= threshold - 1e-12:
                    found.add((min(i, j), max(i, j)))
            index[token].append(i)
    return found


def edited(record: dict, rng: random.Random, vocabulary: list[str]) -> dict:
    """A light edit of a real record: 1-3 words replaced, dropped or added, a counter."""
    words = record["instruction"].split()
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(len(words) + 1)
        kind = rng.random()
        if kind < 0.4 and len(words) > 2 and where < len(words):
            words[where] = rng.choice(vocabulary)
        elif kind < 0.7 and len(words) > 2 and where < len(words):
            del words[where]
        else:
            words.insert(where, rng.choice(vocabulary))
    output = record["output"] + (" More detail." * rng.randint(0, 2))
    return {"instruction": " ".join(words), "input": record["input"], "output": output}


def sample(shared_data: Path, n: int = 20_000) -> list[dict]:
    real = (json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())
            + json.loads((shared_data / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json")
                         .read_text())
            + json.loads((shared_data / "dolly" / "dolly_3k.json").read_text()))
    real = [{"instruction": r["instruction"], "input": r.get("input") or "",
             "output": r["output"]} for r in real]
    rng = random.Random(22)
    vocabulary = [w for r in real[:500] for w in r["instruction"].split()]
    unique = {key(r): r for r in reversed(real)}  # ingest keeps one of identical records
    while len(unique) < n:
        record = edited(rng.choice(real), rng, vocabulary)
        unique.setdefault(key(record), record)
    return list(unique.values())


def key(record: dict) -> tuple[str, str, str]:
    return record["instruction"], record["input"], record["output"]


def test_candidate_pairs_and_the_kept_row_of_each_cluster() -> None:
    keys = np.array([[1, 7], [1, 8], [2, 9], [1, 9], [3, 4]], dtype=np.uint64)
    assert candidate_pairs(keys).tolist() == [[0, 1], [0, 3], [1, 3], [2, 3]]
    labels = np.array([0, 0, 1, 0, 1])
    chars = np.array([5, 9, 3, 9, 3])
    assert keepers(labels, chars, np.array([4, 1, 3, 0, 2])).tolist() == [3, 3, 4, 3, 4]


@pytest.mark.slow
def test_neardup_against_exact_jaccard_on_20k_keeps_the_longest_and_resumes(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.cli import app
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store

    records = sample(shared_data)
    store = Store(str(tmp_path / "store"))
    pool = examples_to_table([Example("mix", i, r["instruction"], r["input"], r["output"])
                              for i, r in enumerate(records)])
    store.write_part("nd", "ingest", 0, pool)
    args = ["neardup", "--run-id", "nd", "--store", store.url, "--batch-size", "5000",
            "--threshold", str(THRESHOLD), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["bands"], summary["rows"]) == (14, 9)  # datasketch, 0.8, 128, weights .1/.9
    assert summary["examples"] == summary["clean"] + summary["near_duplicates"] == 20_000

    rows = pool.select(["id", "instruction", "input", "output", "conversation"]).to_pylist()
    ids = [r["id"] for r in rows]
    at = {example_id: i for i, example_id in enumerate(ids)}
    sets = [frozenset(shingles(text_of(r, "prompt"), SHINGLE)) for r in rows]
    truth = exact_pairs(sets, THRESHOLD)
    out = {r["id"]: r for r in store.read_stage("nd", "neardup").to_pylist()}
    members: dict[str, list[int]] = defaultdict(list)
    for example_id, row in out.items():
        if row["cluster"] is not None:
            members[row["cluster"]].append(at[example_id])
    predicted = {pair for group in members.values() for pair in combinations(sorted(group), 2)}
    recall = len(truth & predicted) / len(truth)
    precision = len(truth & predicted) / len(predicted)
    print(f"true pairs {len(truth)}, predicted {len(predicted)}: recall {recall:.4f}, "
          f"precision {precision:.4f}; {summary['near_duplicates']} marked in "
          f"{summary['clusters']} clusters")
    assert len(truth) > 1_000  # the sample holds near duplicates on both sides of 0.8
    assert recall >= 0.9 and precision >= 0.9

    # every cluster keeps its longest response (ties: the smallest id), once
    for cluster, group in members.items():
        longest = max(len(rows[i]["output"]) for i in group)
        assert out[cluster]["kept"] and len(rows[at[cluster]]["output"]) == longest
        assert sum(out[ids[i]]["near_duplicate"] for i in group) == len(group) - 1
        assert cluster == min(ids[i] for i in group if len(rows[i]["output"]) == longest)

    # two of the four parts lost: the rerun makes only those, and clusters the same
    parts = sorted((tmp_path / "store" / "runs" / "nd" / "minhash").glob("part-*.parquet"))
    assert len(parts) == 4
    for part in parts[1:3]:
        part.unlink()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert (resumed["batches_resumed"], resumed["batches_submitted"]) == (2, 2)
    assert {r["id"]: r for r in store.read_stage("nd", "neardup").to_pylist()} == out

    selected = CliRunner().invoke(app, ["select", "--run-id", "nd", "--store", store.url,
                                        "--selector", "full", "--json"])
    assert selected.exit_code == 0, selected.output
    counts = json.loads(selected.stdout.strip().splitlines()[-1])["reasons"]
    assert counts["near_duplicate"] == summary["near_duplicates"]
    assert counts["kept"] + counts["near_duplicate"] == 20_000
