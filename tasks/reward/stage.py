"""The reward stage on the engine: r(x, y) of every example, from a model each Ray actor holds.

Rows: ``reward`` (the head's scalar), whether the text was cut to the model's length, and
the model's name and version (the cache key: a retrained model scores again). The
selectors read it as the ``reward`` signal: MoDS' quality filter is
``gleaner select --selector threshold --sort-by reward --threshold 0.0``.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import RewardConfig, StoreConfig
from gleaner.devices import placement
from gleaner.engine import Stage, rows_table, stage_schema
from gleaner.engine.stage import declare
from gleaner.store import Store

REWARD_SCHEMA = stage_schema(
    pa.field("reward", pa.float64()),  # null unless status == "ok"
    pa.field("trimmed", pa.bool_()),  # the text was longer than the model's max_length
    pa.field("model", pa.string(), nullable=False),
)


def model_source(store: Store, run_id: str, settings: RewardConfig) -> tuple[str, str, str]:
    """(where the model is, its name, its version) for the configured reward model."""
    if settings.model:
        from gleaner.tasks.evaluate.run import model_version

        return settings.model, settings.model, model_version(settings.model)
    folder = layout.model_dir(store, run_id, layout.REWARD_MODEL)
    metrics = layout.finetune_file(store, run_id, layout.REWARD_MODEL, "metrics.json")
    if not store.exists(posixpath.join(folder, "config.json")) or not store.exists(metrics):
        raise FileNotFoundError(f"run {run_id!r} has no trained reward model in "
                                f"{store.uri(folder)}; run gleaner reward train first")
    version = hashlib.sha256(store.read_bytes(metrics)).hexdigest()[:16]
    return folder, f"{run_id}/{layout.REWARD_MODEL}", version


class RewardWorker:
    """Holds the model (copied from the store first when the store is not a local folder)."""

    def __init__(self, stage: RewardStage):
        from gleaner.tasks.reward.model import RewardScorer

        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        folder = stage.folder
        store = Store(stage.store_config.url, stage.store_config.options)
        if stage.from_store and not store.is_local:  # an object store: copy the model here
            self._scratch = store.copy_to_scratch(folder, "gleaner-rm-")
            folder = self._scratch.name
        self.stage = stage
        settings = stage.settings
        self.scorer = RewardScorer(Path(folder), settings.device, settings.forward_batch_size)
        self.device = placement(self.scorer.model)

    def process(self, rows: pa.Table) -> pa.Table:
        records = rows.to_pylist()
        values, cut = self.scorer.score(records)
        out = [{"id": r["id"], "reward": float(v), "trimmed": c, "model": self.stage.model_name,
                "status": "ok"} for r, v, c in zip(records, values, cut, strict=True)]
        return rows_table(out, REWARD_SCHEMA)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


class RewardStage(Stage):
    """Every ingested example scored by the reward model (an actor pool holding it)."""

    declared = declare(batch_size=256, actors=1)

    name = layout.REWARD
    input_stage = layout.INGEST
    input_columns = ("id", "instruction", "input", "output", "conversation")
    kind = "actor"
    summary_columns = ("reward", "trimmed")
    description = "reward-model score of every example"

    def __init__(self, section: RewardConfig, store_config: StoreConfig, run_id: str):
        super().__init__(section)
        self.settings = section
        self.store_config = store_config
        self.from_store = section.model is None
        store = Store(store_config.url, store_config.options)
        self.folder, self.model_name, self.version = model_source(store, run_id, section)

    @property
    def schema(self) -> pa.Schema:
        return REWARD_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"model": self.model_name, "version": self.version}

    def open(self) -> RewardWorker:
        return RewardWorker(self)

    def row_defaults(self) -> dict[str, Any]:
        return {"model": self.model_name}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        values = [v for v in ok.column("reward").to_pylist() if v is not None]
        return {"model": self.model_name, "version": self.version, "scored": len(values),
                "mean_reward": round(sum(values) / len(values), 4) if values else None,
                "above_zero": sum(1 for v in values if v > 0.0),
                "trimmed": int(pc.sum(ok["trimmed"]).as_py() or 0) if ok.num_rows else 0}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        return (f"reward model `{summary['model']}` ({summary['version']}): "
                f"{summary.get('scored', 0):,} scored, mean {summary.get('mean_reward')}, "
                f"{summary.get('above_zero', 0):,} above 0.0 (MoDS' filter)\n\n"
                + counts_markdown(summary))
