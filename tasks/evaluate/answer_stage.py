"""Answer generation on the engine: prompts in, answers out, on Ray actors holding the model.

Every local-model answer (evaluate's test sets, MT-Bench's two turns, the grid's arms)
goes through :func:`answer_prompts`: the driver renders the prompts in the model's
format (tokenizer only), writes them as the stage's input sorted by length, and the
engine runs the ``evaluate.generation`` back end on ``replicas`` actors, each holding
``gpus`` GPUs (vLLM: one engine across them). So answering is checkpointed per part
(a killed run resumes), retried per part, cached across runs by (prompt, sampling)
and model version, reports the device in its summary, and holds GPUs only while it
answers: the actors go when the model's prompts are done, before the next model loads.
Judging is a separate stage that never asks for a GPU.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gleaner.config import GenerationConfig, GleanerConfig, Resources, StageSection, StoreConfig
from gleaner.engine import Stage, rows_table, run_stage, stage_schema
from gleaner.engine.plan import read_plan
from gleaner.registry import registry
from gleaner.runtime import check_gpus
from gleaner.store import Store
from gleaner.tasks.evaluate.backends import GenerationBackend, ModelSpec, Sampling
from gleaner.tasks.evaluate.generation import answer_in_order

REQUEST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("max_new_tokens", pa.int64(), nullable=False),
    pa.field("temperature", pa.float64(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
])
ANSWER_SCHEMA = stage_schema(pa.field("answer", pa.string()))


def request_id(prompt: str, sampling: Sampling) -> str:
    """A content hash: the same prompt asked the same way is one row (and one cache entry)."""
    blob = json.dumps([prompt, sampling.max_new_tokens, sampling.temperature, sampling.seed])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def requests_table(prompts: Sequence[str], samplings: Sequence[Sampling]) -> pa.Table:
    """One row per distinct (prompt, sampling), shortest prompt first."""
    rows = {request_id(p, s): {"prompt": p, "max_new_tokens": s.max_new_tokens,
                               "temperature": s.temperature, "seed": s.seed}
            for p, s in zip(prompts, samplings, strict=True)}
    ordered = sorted(rows.items(), key=lambda item: (len(item[1]["prompt"]), item[0]))
    return pa.Table.from_pylist([{"id": key, **row} for key, row in ordered],
                                schema=REQUEST_SCHEMA)


@dataclass(frozen=True)
class AnsweringModel:
    """Which model answers: its folder as the driver sees it, where the actors find it (a
    store path when the store is an object store), its version and its name."""

    reference: str
    version: str
    spec: ModelSpec
    store_path: str | None = None  # copied from the store by each actor when set


class AnswerWorker:
    """On a Ray actor: the back end loaded once, answering a part's rows by sampling group."""

    def __init__(self, stage: AnswerStage):
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        spec = stage.model.spec
        if stage.model.store_path is not None:  # an object store: copy the model here
            store = Store(stage.store_config.url, stage.store_config.options)
            self._scratch = store.copy_to_scratch(stage.model.store_path, "gleaner-answer-")
            spec = ModelSpec(self._scratch.name, spec.served_name, spec.stop_ids,
                             spec.stop_texts)
        backend_class = registry("generation_backend").get(stage.settings.backend)
        self.backend: GenerationBackend = backend_class(spec, stage.settings)
        self.device = self.backend.device

    def process(self, rows: pa.Table) -> pa.Table:
        groups: dict[Sampling, list[dict[str, Any]]] = defaultdict(list)
        for row in rows.to_pylist():
            groups[Sampling(row["max_new_tokens"], row["temperature"], row["seed"])].append(row)
        out: list[dict[str, Any]] = []
        for sampling, members in groups.items():
            answers = answer_in_order([r["prompt"] for r in members],
                                      lambda texts, s=sampling: self.backend.generate(texts, s))
            out += [{"id": r["id"], "answer": a, "status": "ok"}
                    for r, a in zip(members, answers, strict=True)]
        return rows_table(out, ANSWER_SCHEMA)

    def close(self) -> None:
        self.backend.close()
        if self._scratch is not None:
            self._scratch.cleanup()


class AnswerStage(Stage):
    """One model's answers to one set of rendered prompts (``<scope>/requests``)."""

    kind = "actor"
    follows_input = True  # other prompts: answer those, reuse the rest from the cache
    input_columns = ("id", "prompt", "max_new_tokens", "temperature", "seed")
    description = "answers of a local model"

    def __init__(self, config: GleanerConfig, scope: str, model: AnsweringModel):
        settings = config.evaluate.generation
        super().__init__(StageSection(
            resources=Resources(batch_size=settings.prompts_per_part, cpus=settings.cpus,
                                gpus=settings.gpus_per_replica(), actors=settings.replicas,
                                retries=settings.retries),
            force=config.evaluate.force, max_failed_share=0.0))
        self.settings: GenerationConfig = settings
        self.store_config: StoreConfig = config.store
        self.model = model
        self.name = f"{scope}/answers"
        self.input_stage = f"{scope}/requests"

    @property
    def cache_name(self) -> str:
        return "answers"  # keyed by (prompt, sampling) ids and the model's version

    @property
    def schema(self) -> pa.Schema:
        return ANSWER_SCHEMA

    def requested(self) -> dict[str, Any]:
        settings = self.settings
        return {"model": self.model.reference, "version": self.model.version,
                "backend": settings.backend, "dtype": settings.dtype,
                "served_name": self.model.spec.served_name if settings.backend == "endpoint"
                else None, "stop_ids": list(self.model.spec.stop_ids)}

    def open(self) -> AnswerWorker:
        return AnswerWorker(self)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        return {"model": self.model.reference, "version": self.model.version,
                "backend": self.settings.backend}


def answer_prompts(store: Store, run_id: str, config: GleanerConfig, scope: str,
                   model: AnsweringModel, prompts: Sequence[str],
                   samplings: Sequence[Sampling]) -> list[str]:
    """The answers to ``prompts`` (rendered), each asked with its sampling, in order.

    Needs Ray (the flows start it); raises when any prompt could not be answered (the
    failed rows and their errors stay in the stage's parts)."""
    check_gpus(config, config.evaluate.generation.gpus_per_replica(),
               "evaluate.generation.gpus")
    stage = AnswerStage(config, scope, model)
    previous = (read_plan(store, run_id, stage.name) or {}).get("requested") or {}
    if previous and previous.get("version") != model.version:
        # retrained under the same name: its old answers go (the cache keeps them by version)
        store.clear_stage(run_id, stage.name)
    requests = requests_table(prompts, samplings)
    store.clear_stage(run_id, stage.input_stage)
    store.write_part(run_id, stage.input_stage, 0, requests)
    run_stage(stage, config, run_id)
    table = store.read_stage(run_id, stage.name, schema=ANSWER_SCHEMA)
    answers = dict(zip(table.column("id").to_pylist(), table.column("answer").to_pylist(),
                       strict=True))
    return [answers[request_id(p, s)] for p, s in zip(prompts, samplings, strict=True)]
