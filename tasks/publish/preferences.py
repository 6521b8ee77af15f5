"""Preference data out: comparison pairs and pairwise verdicts as a published dataset version.

A version holds one row a pair in the columns TRL's preference trainers read (``prompt``,
``chosen``, ``rejected``), with ``margin`` (the judge's score difference) and ``source``
(where the pair came from), and the pair's own fields (``prompt_id``, ``instruction``,
``input``, ``turns``) so that ``gleaner dpo train --preferences NAME`` trains on it through
the same conversion it applies to a run's pairs (tasks/compare/preferences.py). It leaves the
store through the export registry like any selection (``--format jsonl|parquet|hf``).

Verdicts become pairs by the evaluation's own combination rule: the winner's answer is
chosen; ties and judge failures make no pair. A side's score is its mean over both orders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.schema import TURN_TYPE
from gleaner.store import Store
from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
from gleaner.tasks.compare.preferences import read_pairs
from gleaner.tasks.evaluate.stage import JUDGEMENT_SCHEMA, pair_id
from gleaner.tasks.evaluate.verdicts import LOSE, WIN, verdict
from gleaner.tasks.publish.versions import (
    ids_digest,
    list_versions,
    publish_dataset_version,
    read_version,
)

PREFERENCE_VERSION_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # the request as plain text
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("margin", pa.float64(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("turns", pa.list_(TURN_TYPE), nullable=False),
    pa.field("chosen_score", pa.float64(), nullable=False),
    pa.field("rejected_score", pa.float64(), nullable=False),
])


def request_text(pair: Mapping[str, Any]) -> str:
    """The request as one plain text: the instruction and its input, or the last user turn."""
    turns = [t for t in (pair.get("turns") or []) if t["role"] == "user"]
    if len(pair.get("turns") or []) > 2 and turns:
        return turns[-1]["content"]
    return "\n\n".join(part for part in (pair["instruction"], pair.get("input") or "") if part)


def version_rows(pairs: Iterable[Mapping[str, Any]], source: str) -> pa.Table:
    """Pairs (a run's comparison pairs, or verdict pairs) as a preference version's rows."""
    return pa.Table.from_pylist([
        {"id": p["id"], "prompt": request_text(p), "chosen": p["chosen"],
         "rejected": p["rejected"], "margin": p["margin"], "source": source,
         "prompt_id": p["prompt_id"], "instruction": p["instruction"],
         "input": p.get("input") or "", "turns": list(p.get("turns") or []),
         "chosen_score": p["chosen_score"], "rejected_score": p["rejected_score"]}
        for p in pairs], schema=PREFERENCE_VERSION_SCHEMA)


def verdict_pairs(judgements: pa.Table, rule: str) -> list[dict[str, Any]]:
    """One pair per judged prompt that A won or lost under ``rule`` (winner chosen)."""
    out = []
    for row in judgements.to_pylist():
        if row["status"] != "ok":
            continue
        decided = verdict(row["outcome_a_first"], row["outcome_b_first"], rule)
        if decided not in (WIN, LOSE):
            continue
        score_a = (row["a_first_score_1"] + row["b_first_score_2"]) / 2
        score_b = (row["a_first_score_2"] + row["b_first_score_1"]) / 2
        a_wins = decided == WIN
        chosen, rejected = (row["answer_a"], row["answer_b"]) if a_wins else (
            row["answer_b"], row["answer_a"])
        high, low = (score_a, score_b) if a_wins else (score_b, score_a)
        out.append({"id": pair_id(row["question"], chosen, rejected),
                    "prompt_id": f"{row['test_set']}:{row['key']}",
                    "instruction": row["question"], "input": "", "turns": [],
                    "chosen": chosen, "rejected": rejected, "chosen_score": float(high),
                    "rejected_score": float(low), "margin": float(high - low)})
    return out


def comparison_verdicts(store: Store, run_id: str, comparison: str | None
                        ) -> tuple[str, str, pa.Table]:
    """(comparison, rule, every test set's judgements) of one pairwise evaluation of the run."""
    from gleaner.tasks.evaluate.run import stored_comparisons

    stored = stored_comparisons(store, run_id)
    names = list(stored)
    if comparison is None:
        if len(names) != 1:
            raise ValueError(
                f"run {run_id!r} holds {len(names)} pairwise evaluations"
                + (f" ({', '.join(names)}): name one with --comparison" if names else
                   ": run gleaner evaluate first"))
        comparison = names[0]
    elif comparison not in names:
        raise FileNotFoundError(f"run {run_id!r} has no evaluation {comparison!r} "
                                f"(it has: {', '.join(names) or 'none'})")
    summary = stored[comparison]
    tables = [store.read_stage(run_id, layout.judge_stage(comparison, name),
                               schema=JUDGEMENT_SCHEMA) for name in summary["test_sets"]
              if store.has_stage(run_id, layout.judge_stage(comparison, name))]
    judged = pa.concat_tables(tables) if tables else JUDGEMENT_SCHEMA.empty_table()
    return comparison, summary["rule"], judged


def publish_preferences(store: Store, run_id: str, name: str, origin: str,
                        comparison: str | None = None) -> dict[str, Any]:
    """Publish the run's comparison pairs (``origin`` compare) or an evaluation's verdicts
    (``origin`` verdicts) as the next version of dataset ``name``; its manifest."""
    if origin == "compare":
        pairs, source = read_pairs(store, run_id).to_pylist(), f"compare:{run_id}"
    elif origin == "verdicts":
        comparison, rule, judged = comparison_verdicts(store, run_id, comparison)
        pairs, source = verdict_pairs(judged, rule), f"verdicts:{run_id}/{comparison}"
    else:
        raise ValueError(f"--from must be compare or verdicts, not {origin!r}")
    if not pairs:
        raise ValueError(f"run {run_id!r}: no {origin} pair to publish (every prompt tied or "
                         "failed?)")
    table = version_rows(pairs, source)
    digest = ids_digest(pc.unique(table.column("id").combine_chunks()))
    mine = [v for v in list_versions(store, name) if v["run_id"] == run_id]
    for version in reversed(mine):
        if version.get("ids_sha256") == digest:
            return version  # these pairs are published already
    return publish_dataset_version(store, name, run_id, table, {"preference_source": source},
                                   provenance={"kind": "preferences", "origin": source},
                                   again=bool(mine))  # other pairs of the run: a new version


def version_pairs(store: Store, spec: str) -> pa.Table:
    """A published preference version (``NAME`` or ``NAME@N``) as pairs a trainer reads."""
    name, _, number = spec.partition("@")
    table = read_version(store, name, int(number.lstrip("v")) if number else None)
    missing = [f for f in ("prompt_id", "instruction", "chosen", "rejected")
               if f not in table.column_names]
    if missing:
        raise ValueError(f"dataset {spec!r} is not a preference version (no {', '.join(missing)}"
                         "): publish one with gleaner preferences")
    rows = [{f.name: row.get(f.name, 0.0 if pa.types.is_floating(f.type) else
                             [] if pa.types.is_list(f.type) else "")
             for f in PAIRS_SCHEMA} for row in table.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)
