"""What the Batch API path keeps in the store, so a killed driver pays for nothing twice.

``runs/<id>/<stage>/_batch/`` (paths in gleaner.layout):

- ``state.json``: every batch of the stage, in order: its round, endpoint (the
  key's environment variable, never the key), request count, and as soon as
  the provider gives them the input file id and the batch id, then its status,
  counts and output/error file ids. Written before each next step, so a rerun
  resumes each batch where it was: a prepared file is uploaded, an uploaded one
  becomes a batch (or is found among the account's batches when the driver
  died right after creating it), a submitted batch is polled, a finished one
  read back. Nothing is sent again unless the provider lost it.
- ``requests/NNNNN.jsonl``: the input file exactly as uploaded;
  ``keys/NNNNN.parquet``: its custom ids;
- ``answers/NNNNN.parquet``: one row per request of a finished batch: the
  response (any status) or why there is none (error file, expired, cancelled,
  missing).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import BatchAPIConfig, EndpointConfig
from gleaner.engine.replay import ANSWER_SCHEMA, Answer, BatchRequest, key_of
from gleaner.llm.batches import BatchAPI
from gleaner.store import Store

log = logging.getLogger("gleaner.batch_api")
KEYS_SCHEMA = pa.schema([pa.field("custom_id", pa.string(), nullable=False),
                         pa.field("key", pa.string(), nullable=False),
                         pa.field("example_id", pa.string(), nullable=False)])


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class BatchRecord:
    """One provider batch of one stage run (one input file)."""

    number: int
    round: int
    invocation: int  # which run of the stage prepared it (--retry-failed starts another)
    endpoint: dict[str, Any]  # EndpointConfig fields: base_url, model, api_key_env, ...
    url: str  # /v1/chat/completions or /v1/completions
    requests: int
    bytes: int
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "prepared"  # then the provider's: validating, in_progress, ..., completed
    counts: dict[str, int] = field(default_factory=dict)  # total, completed, failed
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[str] = field(default_factory=list)
    collected: bool = False  # its answers are in the store
    answered: int = 0  # lines with a 200 response
    lost: int = 0  # requests without one (error file, expired, cancelled, missing)
    updated_at: str = ""

    def endpoint_config(self) -> EndpointConfig:
        return EndpointConfig.model_validate(self.endpoint)


@dataclass
class BatchState:
    run_id: str
    stage: str
    invocation: int = 0  # runs of the stage so far (one killed and rerun is one run)
    finished: bool = True  # the last run got every row written
    rounds: int = 0
    batches: list[BatchRecord] = field(default_factory=list)

    @classmethod
    def load(cls, store: Store, run_id: str, stage: str) -> BatchState:
        path = layout.batch_state_path(store, run_id, stage)
        if not store.exists(path):
            return cls(run_id, stage)
        document = store.read_json(path)
        records = [BatchRecord(**r) for r in document.pop("batches", [])]
        return cls(**document, batches=records)

    def save(self, store: Store) -> None:
        store.write_json(layout.batch_state_path(store, self.run_id, self.stage),
                         {"run_id": self.run_id, "stage": self.stage,
                          "invocation": self.invocation, "finished": self.finished,
                          "rounds": self.rounds,
                          "batches": [asdict(r) for r in self.batches]})

    def uncollected(self) -> list[BatchRecord]:
        return [r for r in self.batches if not r.collected]

    def requests(self) -> int:
        return sum(r.requests for r in self.batches)


def _split(requests: list[BatchRequest], settings: BatchAPIConfig
           ) -> Iterable[tuple[list[BatchRequest], bytes]]:
    """Input files within the provider's limits (requests and bytes per file)."""
    lines: list[bytes] = []
    chunk: list[BatchRequest] = []
    size = 0
    for request in requests:
        line = request.line()
        if chunk and (len(chunk) >= settings.max_requests_per_file
                      or size + len(line) > settings.max_file_bytes):
            yield chunk, b"".join(lines)
            chunk, lines, size = [], [], 0
        chunk.append(request)
        lines.append(line)
        size += len(line)
    if chunk:
        yield chunk, b"".join(lines)


def prepare(store: Store, state: BatchState, requests: list[BatchRequest],
            settings: BatchAPIConfig) -> list[BatchRecord]:
    """Write the round's input files and record them, before anything is sent."""
    groups: dict[tuple[str, str], list[BatchRequest]] = defaultdict(list)
    for request in {r.custom_id: r for r in requests}.values():  # one line per custom id
        groups[(request.endpoint.model_dump_json(), request.url)].append(request)
    state.rounds += 1
    made: list[BatchRecord] = []
    for (endpoint_json, url), members in sorted(groups.items()):
        endpoint = EndpointConfig.model_validate_json(endpoint_json)
        for chunk, data in _split(members, settings):
            number = len(state.batches)
            store.write_bytes(layout.batch_file(store, state.run_id, state.stage, "requests",
                                                number, "jsonl"), data)
            store.write_table(layout.batch_file(store, state.run_id, state.stage, "keys",
                                                number, "parquet"),
                              pa.Table.from_pylist([{"custom_id": r.custom_id, "key": r.key,
                                                     "example_id": r.example_id}
                                                    for r in chunk], schema=KEYS_SCHEMA))
            record = BatchRecord(number, state.rounds, state.invocation,
                                 endpoint.model_dump(mode="json"), url, len(chunk), len(data),
                                 updated_at=_now())
            state.batches.append(record)
            made.append(record)
    state.save(store)
    return made


def submit(store: Store, state: BatchState, record: BatchRecord, api: BatchAPI,
           window: str) -> None:
    """Upload the record's file and create its batch, recording each id as it comes."""
    if record.input_file_id is None:
        data = store.read_bytes(layout.batch_file(store, state.run_id, state.stage, "requests",
                                                  record.number, "jsonl"))
        name = f"gleaner-{state.run_id}-{state.stage.replace('/', '-')}-{record.number:05d}.jsonl"
        record.input_file_id = api.upload(name, data)
        record.status, record.updated_at = "uploaded", _now()
        state.save(store)
    if record.batch_id is None:
        batch = api.find(record.input_file_id) if record.status == "creating" else None
        if batch is None:
            record.status = "creating"  # a driver killed from here on looks the batch up
            state.save(store)
            batch = api.create(record.input_file_id, record.url, window, {
                "gleaner_run": state.run_id[:512], "gleaner_stage": state.stage[:512],
                "gleaner_file": str(record.number)})
        record.batch_id = batch.id
        update(record, batch)
        state.save(store)


def update(record: BatchRecord, batch: Any) -> None:
    """The provider's view of the batch, as the record keeps it."""
    record.status = batch.status
    counts = batch.request_counts
    if counts is not None:
        record.counts = {"total": counts.total, "completed": counts.completed,
                         "failed": counts.failed}
    record.output_file_id = batch.output_file_id
    record.error_file_id = batch.error_file_id
    errors = getattr(batch, "errors", None)
    if errors is not None and errors.data:
        record.errors = [f"{e.code}: {e.message}" for e in errors.data][:20]
    record.updated_at = _now()


def collect(store: Store, state: BatchState, record: BatchRecord, api: BatchAPI) -> None:
    """Read a finished batch's output and error files: one answers row per request sent."""
    keys = store.dataset([layout.batch_file(store, state.run_id, state.stage, "keys",
                                            record.number, "parquet")]).to_table()
    sent = dict(zip(keys.column("custom_id").to_pylist(), keys.column("example_id").to_pylist(),
                    strict=True))
    lines: dict[str, Answer] = {}
    for file_id in (record.output_file_id, record.error_file_id):
        if not file_id:
            continue
        for line in api.lines(file_id):
            if line.custom_id not in sent:
                log.warning("batch %s answered a custom_id it was not sent: %s", record.batch_id,
                            line.custom_id)
                continue
            if line.custom_id in lines and lines[line.custom_id].status_code == 200:
                continue  # the first answer of a request counts
            lines[line.custom_id] = Answer(line.custom_id, line.status_code, line.body,
                                           line.error_code, line.error_message)
    ended = ("expired", "cancelled", "failed", "rejected")
    why = f"batch_{record.status}" if record.status in ended else "missing"
    detail = "; ".join(record.errors) or f"the batch ended {record.status} without answering it"
    rows = []
    for custom_id, example_id in sent.items():
        answer = lines.get(custom_id) or Answer(custom_id, None, None, why, detail)
        rows.append({"custom_id": custom_id, "key": key_of(custom_id), "example_id": example_id,
                     "status_code": answer.status_code, "body": answer.body,
                     "error_code": answer.error_code, "error_message": answer.error_message,
                     "batch_id": record.batch_id})
    store.write_table(layout.batch_file(store, state.run_id, state.stage, "answers",
                                        record.number, "parquet"),
                      pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA))
    record.answered = sum(1 for r in rows if r["status_code"] == 200)
    record.lost = len(rows) - record.answered
    record.collected, record.updated_at = True, _now()
    state.save(store)


class AnswerIndex:
    """The answers read back so far, looked up by the example ids of a batch of rows."""

    def __init__(self, store: Store, state: BatchState):
        self.store = store
        self.files = [(layout.batch_file(store, state.run_id, state.stage, "answers", r.number,
                                         "parquet"), r.invocation)
                      for r in state.batches if r.collected]

    def lookup(self, ids: list[str], since: int = 0
               ) -> tuple[dict[str, list[Answer]], Counter[str]]:
        """(answers by key from batches of invocation >= ``since``, lines sent per key)."""
        answers: dict[str, list[Answer]] = defaultdict(list)
        sent: Counter[str] = Counter()
        if not self.files or not ids:
            return answers, sent
        wanted = pa.array(ids, pa.string())
        for path, invocation in self.files:
            table = self.store.dataset([path], schema=ANSWER_SCHEMA).to_table(
                filter=pc.field("example_id").isin(wanted))
            for row in table.to_pylist():
                sent[row["key"]] += 1
                if invocation >= since:
                    answers[row["key"]].append(Answer(row["custom_id"], row["status_code"],
                                                      row["body"], row["error_code"],
                                                      row["error_message"]))
        return answers, sent
