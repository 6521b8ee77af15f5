"""The engine's one LLM row loop, driven by a toy stage written against it: two dependent calls
per row, parse retries, transport failures and a fatal error, on a real loopback OpenAI server
through Prefect tasks on Ray; a rerun resumes (nothing asked again) and another run reuses the
cache. Plus the structural rule: no stage outside the engine catches the client's errors or
loops on parse retries."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.config import EndpointConfig, GleanerConfig, StageSection
from gleaner.engine import (
    Call,
    Conversation,
    FatalStageError,
    LLMRowStage,
    ParseFailure,
    run_stage,
    stage_schema,
)
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store
from tests.support.openai_server import OpenAIStub, Reply, request_text

ROOT = Path(__file__).resolve().parents[1]
COUNT_SCHEMA = stage_schema(pa.field("words", pa.int64()), pa.field("doubled", pa.int64()),
                            pa.field("raw", pa.string()), llm=True)


class CountSection(StageSection):
    endpoint: EndpointConfig
    parse_retries: int = 2


def read_number(completion: Any) -> int:
    found = re.search(r"\d+", completion.text)
    if found is None:
        raise ParseFailure("no number")
    return int(found.group())


class WordCount(LLMRowStage):
    """Asks how many words an instruction has, then (a dependent call) for twice that."""

    name = "count"
    input_columns = ("id", "instruction")

    @property
    def endpoint(self) -> EndpointConfig:
        return self.section.endpoint  # type: ignore[attr-defined]

    @property
    def schema(self) -> pa.Schema:
        return COUNT_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"model": self.endpoint.model, "prompt": "v1"}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        words = yield Call(read_number, [{"role": "user",
                                          "content": f"Count the words: {row['instruction']}"}])
        doubled = yield Call(read_number, prompt=f"Double {words.value}:", max_tokens=8)
        return {"words": words.value, "doubled": doubled.value}


class Counter:
    """Counts words honestly, except: 'mumble' rows answer prose twice before a number,
    'silent' rows never answer a number, 'broken' rows get HTTP 500, 'forbidden' 401."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}

    def __call__(self, body: dict[str, Any]) -> Reply:
        text = request_text(body)
        if text == "Say OK.":
            return Reply("OK")
        if text.startswith("Double "):
            return Reply(str(2 * int(text.split()[1].rstrip(":"))))
        instruction = text.removeprefix("Count the words: ")
        self.asked[instruction] = self.asked.get(instruction, 0) + 1
        if "forbidden" in instruction:
            return Reply(status=401, error_message="Incorrect API key provided")
        if "broken" in instruction:
            return Reply(status=500)
        if "silent" in instruction or ("mumble" in instruction
                                       and self.asked[instruction] <= 2):
            return Reply("Let me think about it.")
        return Reply(f"{len(instruction.split())} words")


@flow(name="count", task_runner=RayTaskRunner(), validate_parameters=False)
def count_flow(run_id: str, config: GleanerConfig, section: dict[str, Any]) -> dict[str, Any]:
    return run_stage(WordCount(CountSection.model_validate(section)), config, run_id)


@pytest.fixture
def toy_by_value(ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not installed


def pool(instructions: list[str]) -> pa.Table:
    return examples_to_table([Example("toy", i, text, output="x")
                              for i, text in enumerate(instructions)])


def test_a_toy_stage_on_the_row_loop(prefect_api, toy_by_value, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    instructions = ["one two three", "mumble mumble now", "silent here", "broken answer",
                    "four five six seven", "eight"]
    store.write_part("r1", "ingest", 0, pool(instructions))
    store.write_part("r2", "ingest", 0, pool(instructions))
    config = GleanerConfig().with_overrides({"store.url": store.url})
    counter = Counter()
    with OpenAIStub(counter) as stub:
        section = {"endpoint": {"base_url": stub.base_url, "model": "stub", "max_retries": 0},
                   "resources": {"batch_size": 4, "retries": 0}, "max_failed_share": 1.0}
        summary = count_flow(run_id="r1", config=config, section=section)
        sent = stub.count()
        again = count_flow(run_id="r1", config=config, section=section)  # resumed: all done
        assert stub.count() == sent and again["batches_submitted"] == 0
        cached = count_flow(run_id="r2", config=config, section=section)
        assert cached["cached"] == 4  # every ok row, from the first run's cache
        # a probe, then only the two failed rows asked again: 3 unparseable answers, one 500
        assert stub.count() - sent == 1 + 3 + 1

        store.write_part("r3", "ingest", 0, pool(["forbidden words"]))
        with pytest.raises(FatalStageError, match="Incorrect API key"):
            count_flow(run_id="r3", config=config, section=section)
    rows = {r["id"]: r for r in store.read_stage("r1", "count").to_pylist()}
    by_text = dict(zip(instructions, pool(instructions).column("id").to_pylist(), strict=True))
    ok = rows[by_text["one two three"]]
    assert (ok["status"], ok["words"], ok["doubled"], ok["raw"]) == ("ok", 3, 6, "6")
    assert (ok["attempts"], ok["completion_tokens"] > 0) == (2, True)  # both calls counted
    mumble = rows[by_text["mumble mumble now"]]
    assert (mumble["status"], mumble["words"], mumble["attempts"]) == ("ok", 3, 4)
    silent = rows[by_text["silent here"]]
    assert (silent["status"], silent["error_kind"], silent["attempts"]) == ("failed", "parse", 3)
    assert silent["error"] == "parse failure after 3 answers: no number"
    assert silent["raw"] == "Let me think about it." and silent["words"] is None
    broken = rows[by_text["broken answer"]]
    assert broken["status"] == "failed" and broken["error_kind"] != "parse"
    assert (summary["ok"], summary["failed"], summary["examples"]) == (4, 2, 6)


STAGE_PACKAGES = ("tasks", "flows")
# It asks an endpoint one question to diagnose it (key, model, logprobs) and runs no rows.
NOT_A_STAGE = {"flows/doctor.py"}


def test_no_stage_catches_the_clients_errors_or_loops_on_parse_retries() -> None:
    """The row loop lives in gleaner/engine only: a stage never catches LLMError and never
    loops over ``parse_retries`` itself."""
    offenders: set[str] = set()
    for package in STAGE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                caught = node.type if isinstance(node, ast.ExceptHandler) else None
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                         for n in ast.walk(caught)} if caught is not None else set()
                if "LLMError" in names or (isinstance(node, ast.For)
                                           and "parse_retries" in ast.unparse(node.iter)):
                    offenders.add(str(path.relative_to(ROOT)))
    assert offenders == NOT_A_STAGE, sorted(offenders ^ NOT_A_STAGE)
