"""Each distinct selection of an experiment: a manifest in the run, a published dataset version.

The pool's signals are read once for all arms; each selection runs its selector
(tasks/select/selectors.py) and writes its manifest (every pool example,
selected or not and why) as ``experiment/<name>/select/<selection>``. Its
selected examples become a version of dataset ``<experiment>-<arm>-<key>``:
publishing is idempotent per run, so a rerun finds the version it made and
checks that the selection still has the same examples (a pool whose signals
changed since must not be trained on silently).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.experiment.arms import Selection
from gleaner.tasks.length.stage import responses
from gleaner.tasks.publish.versions import ids_digest, publish_dataset_version
from gleaner.tasks.select.selectors import selector
from gleaner.tasks.select.stage import load_candidates, read_examples, select_manifest


def picked_examples(pool: pa.Table, chosen: list[str]) -> pa.Table:
    """The selected examples in selection order."""
    picked = pool.filter(pc.is_in(pool["id"], value_set=pa.array(chosen, pa.string())))
    position = {example_id: i for i, example_id in enumerate(chosen)}
    order = np.argsort([position[i] for i in picked.column("id").to_pylist()], kind="stable")
    return picked.take(pa.array(order, pa.int64())) if picked.num_rows else picked


def response_lengths(picked: pa.Table, tokens: dict[str, int] | None) -> dict[str, float | None]:
    """Mean response characters (every assistant turn), and tokens when the pool counted them."""
    rows = picked.select(["id", "output", "conversation"]).to_pylist()
    chars = [sum(len(t) for t in responses(r["conversation"], r["output"])) for r in rows]
    counted = [tokens[r["id"]] for r in rows if tokens and tokens.get(r["id"]) is not None]
    return {"mean_response_chars": float(np.mean(chars)) if chars else None,
            "mean_response_tokens": float(np.mean(counted)) if counted else None}


def pool_tokens(store: Store, pool_run: str) -> dict[str, int] | None:
    if not store.has_stage(pool_run, layout.LENGTH):
        return None
    table = store.read_stage(pool_run, layout.LENGTH, columns=["id", "status", "response_tokens"])
    return {r["id"]: r["response_tokens"] for r in table.to_pylist() if r["status"] == "ok"}


def select_one(store: Store, run_id: str, config: GleanerConfig, selection: Selection,
               data: Any, pool: pa.Table, size: int | None) -> dict[str, Any]:
    """One selection's manifest and dataset version; returns what the table reports of it."""
    name = config.experiment.name
    manifest = select_manifest(data, config.model_copy(update={"select": selection.select}), size)
    stage = layout.experiment_select_stage(name, selection.name)
    store.clear_stage(run_id, stage)
    store.write_part(run_id, stage, 0, manifest.to_table())
    picked = picked_examples(pool, manifest.selected_ids)
    version = publish_dataset_version(store, selection.dataset, run_id, picked, {
        "experiment": name, "arms": selection.arms, "selection": selection.settings},
        provenance={"kind": "experiment selection", "experiment": name,
                    "selection": {"name": selection.name, "key": selection.key,
                                  "arms": selection.arms, "settings": selection.settings}})
    fresh = ids_digest(pc.unique(picked.column("id").combine_chunks()))
    if version["ids_sha256"] != fresh:
        raise ValueError(
            f"arm {selection.name!r}: run {run_id!r} published {selection.dataset} "
            f"{version['label']} with other examples than the selection makes now (the pool's "
            "signals changed since): start the experiment under another run id or name")
    return {"selection": selection.name, "arms": selection.arms, "key": selection.key,
            "settings": selection.settings, "examples": picked.num_rows,
            "reasons": manifest.counts(), "manifest_stage": stage,
            "dataset": {k: version[k] for k in ("name", "version", "label", "uri")},
            **response_lengths(picked, pool_tokens(store, config_pool(config, run_id)))}


def config_pool(config: GleanerConfig, run_id: str) -> str:
    from gleaner.tasks.experiment.pool import pool_run

    return pool_run(config, run_id)


@task(name="experiment-select", cache_policy=NO_CACHE)
def select_all(run_id: str, config: GleanerConfig, selections: list[Selection]
               ) -> dict[str, dict[str, Any]]:
    """Every selection, in dependency order (``size_of`` after the selection it names)."""
    store = Store(config.store.url, config.store.options)
    pool_run = config_pool(config, run_id)
    vectors = any(selector(s.select.selector).needs_vectors for s in selections)
    data = load_candidates(store, pool_run, need_vectors=vectors)
    pool = read_examples(store, pool_run)
    out: dict[str, dict[str, Any]] = {}
    for selection in selections:
        size = out[selection.size_of]["examples"] if selection.size_of else None
        out[selection.name] = select_one(store, run_id, config, selection, data, pool, size)
    return out
