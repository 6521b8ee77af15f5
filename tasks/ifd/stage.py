"""The IFD stage on the engine: an actor stage, each Ray actor holding the causal LM.

One row per ingested example: ``loss_conditioned`` = L(A|Q), ``loss_alone`` =
L(A), ``ifd`` = their ratio (tasks/ifd/loss.py says exactly what is read). An
example that cannot be scored (an empty response, a question that fills
``max_length``) is a failed row with the reason (kind ``input``). Cached across
runs by (example id, model, max_length, prompt version), like every stage.
Superfiltering is this stage with a small model: the offline default, SmolLM2-135M.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import IFDConfig
from gleaner.devices import placement
from gleaner.engine import Stage, rows_table, stage_schema
from gleaner.engine.stage import declare
from gleaner.tasks.ifd.loss import PROMPT_VERSION, IFDScorer

IFD_SCHEMA = stage_schema(
    pa.field("loss_conditioned", pa.float64()),  # L(A|Q), null unless ok
    pa.field("loss_alone", pa.float64()),  # L(A)
    pa.field("ifd", pa.float64()),  # L(A|Q) / L(A)
    pa.field("answer_tokens", pa.int32(), nullable=False),  # answer tokens scored
    pa.field("truncated", pa.bool_(), nullable=False),  # the answer was cut at max_length
    pa.field("model", pa.string(), nullable=False),
)


def model_name(settings: IFDConfig) -> str:
    from gleaner.tasks.deita.score import resolve_model

    return resolve_model(settings.model)[2]


class IFDWorker:
    def __init__(self, settings: IFDConfig):
        self.scorer = IFDScorer(settings.model, settings.device, settings.forward_batch_size,
                                settings.max_length)
        self.device = placement(self.scorer.model)

    def process(self, rows: pa.Table) -> pa.Table:
        examples = rows.to_pylist()
        out = []
        for example, score in zip(examples, self.scorer.score(examples), strict=True):
            row = {"id": example["id"], "model": self.scorer.name,
                   "answer_tokens": score.answer_tokens, "truncated": score.truncated,
                   "loss_conditioned": score.loss_conditioned, "loss_alone": score.loss_alone,
                   "ifd": score.ifd, "status": "ok" if score.error is None else "failed"}
            if score.error is not None:
                row.update(error=score.error, error_kind="input")
            out.append(row)
        return rows_table(out, IFD_SCHEMA)

    def close(self) -> None:
        return None


class IFDStage(Stage):
    """IFD of every ingested example (Cherry LLM; Superfiltering with a small model)."""

    declared = declare(batch_size=64, actors=1)

    name = layout.IFD
    input_stage = layout.INGEST
    input_columns = ("id", "instruction", "input", "output", "conversation")
    kind = "actor"
    summary_columns = ("ifd", "truncated")
    description = "IFD: the answer's loss with and without the question"

    def __init__(self, section: IFDConfig):
        super().__init__(section)
        self.settings = section

    @property
    def schema(self) -> pa.Schema:
        return IFD_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"model": model_name(self.settings), "max_length": self.settings.max_length,
                "prompt_version": PROMPT_VERSION}

    def row_defaults(self) -> dict[str, Any]:
        return {"model": model_name(self.settings), "answer_tokens": 0, "truncated": False}

    def open(self) -> IFDWorker:
        return IFDWorker(self.settings)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        values = ok["ifd"]
        over = int(pc.sum(pc.greater(values, 1.0)).as_py() or 0) if ok.num_rows else 0
        mean = pc.mean(values).as_py() if ok.num_rows else None
        return {"model": model_name(self.settings), "scored": ok.num_rows,
                "mean_ifd": None if mean is None else round(mean, 4), "ifd_above_1": over,
                "truncated": int(pc.sum(table["truncated"]).as_py() or 0)}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        return "\n".join([
            counts_markdown(summary), "", f"Model: {summary.get('model')}", "",
            "| scored | mean IFD | IFD > 1 (dropped by the ifd selector) | answers cut |",
            "|---:|---:|---:|---:|",
            f"| {summary.get('scored')} | {summary.get('mean_ifd')} | "
            f"{summary.get('ifd_above_1')} | {summary.get('truncated')} |"])
