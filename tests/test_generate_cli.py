"""``gleaner generate self-instruct && gleaner rate && gleaner select``: the user's path, as
subprocesses against a real Prefect API, with a loopback generator and rater; and the same on
the offline default (SmolLM2 under llama.cpp answers; most of what it makes is filtered)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from gleaner import layout
from gleaner.runs import read_run
from gleaner.store import Store
from gleaner.tasks.generate.filters import REASONS
from tests.support.curate_run import gleaner_command
from tests.support.openai_server import OpenAIStub, Reply
from tests.support.pipeline import ROOT, prefect_env
from tests.support.selfinstruct_stub import GrowingResponder

JSON_KEYS = ("requests", "parsed", "kept", "filtered", "prompt_tokens", "completion_tokens",
             "est_cost_usd")


def gleaner(env: dict[str, str], *args: str, timeout: float = 900) -> dict:
    result = subprocess.run([*gleaner_command(), *args, "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"gleaner {args[0]}: {result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


class GeneratorAndRater:
    """Completions (self-instruct) from real Alpaca instructions; chat (rating) a score."""

    def __init__(self, instructions: list[str]):
        self.generate = GrowingResponder(instructions)

    def __call__(self, body: dict) -> Reply:
        if "prompt" in body:
            return self.generate(body)
        key = hashlib.sha256(json.dumps(body["messages"]).encode()).digest()[0]
        return Reply(f"{4 + (key % 3) / 2}\nA fair answer.")  # 4.0, 4.5 or 5.0


@pytest.mark.e2e
def test_generate_then_rate_then_select(prefect_api: str, tmp_path: Path,
                                        shared_data: Path) -> None:
    store = tmp_path / "store"
    seeds = str(shared_data / "alpaca_seed/seed_tasks.jsonl")
    instructions = [r["instruction"] for r in json.loads(
        (shared_data / "alpaca/alpaca_random_9k.json").read_text())]
    env = prefect_env(prefect_api, GLEANER_PROGRESS="off")
    env.pop("RAY_ADDRESS", None)
    with OpenAIStub(GeneratorAndRater(instructions)) as stub:
        made = gleaner(env, "generate", "self-instruct", "--seeds", seeds, "--count", "30",
                       "--run-id", "cli", "--store", str(store), "--base-url", stub.base_url,
                       "--model", "gpt-3.5-turbo-instruct")
        rated = gleaner(env, "rate", "--run-id", "cli", "--store", str(store), "--base-url",
                        stub.base_url, "--model", "rater", "--mode", "explain")
    chosen = gleaner(env, "select", "--run-id", "cli", "--store", str(store), "--selector",
                     "threshold", "--threshold", "4.5")
    assert all(key in made for key in JSON_KEYS)
    assert made["kept"] >= 30 and made["price_known"] and made["est_cost_usd"] > 0
    assert rated["examples"] == rated["ok"] == made["kept"]  # rate read the made examples
    assert chosen["examples"] == made["kept"] and 0 < chosen["selected"] < made["kept"]
    record = read_run(Store(str(store)), "cli")
    assert record["generate"]["kept"] == made["kept"]
    assert record["ingest"]["made_by"] == "alpaca-self-instruct"


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_offline_default_finishes_with_honest_counts(prefect_api: str, tmp_path: Path,
                                                     shared_data: Path) -> None:
    """No endpoint: SmolLM2-135M continues the list (badly); the run ends, every candidate
    counted with its reason, and rate and select run on whatever it kept."""
    store = tmp_path / "store"
    seeds = str(shared_data / "alpaca_seed/seed_tasks.jsonl")
    env = prefect_env(prefect_api, GLEANER_PROGRESS="off")
    for name in ("RAY_ADDRESS", "OPENAI_API_KEY"):
        env.pop(name, None)
    for max_rounds in (3, 6, 9):  # a rerun with more rounds resumes after the finished ones
        made = gleaner(env, "generate", "self-instruct", "--seeds", seeds, "--count", "1",
                       "--run-id", "offline", "--store", str(store), "--requests-per-round",
                       "2", "--max-rounds", str(max_rounds))
        if made["kept"]:
            break
    print("\noffline self-instruct:", json.dumps({k: made[k] for k in (
        "rounds", "prompts", "candidates", "parsed", "kept", "filtered", "stop_reason",
        "completion_tokens", "seconds")}))
    assert made["status"] == "completed" and made["model"] == "smollm2-135m-instruct"
    assert made["settings"]["max_tokens"] == 384  # capped for the 2,048-token context
    assert made["prompts"] == made["ok"] + made["failed"] == 2 * made["rounds"]
    assert made["candidates"] == made["kept"] + sum(made["filtered"].values())
    assert set(made["filtered"]) <= set(REASONS)
    assert made["kept"] >= 1, f"SmolLM2 kept nothing in {made['rounds']} rounds: {made}"
    rated = gleaner(env, "rate", "--run-id", "offline", "--store", str(store))
    assert rated["examples"] == made["kept"] == rated["ok"] + rated["failed"]
    chosen = gleaner(env, "select", "--run-id", "offline", "--store", str(store), "--selector",
                     "threshold", "--threshold", "0")
    assert chosen["examples"] == made["kept"]
    assert Store(str(store)).read_stage("offline", layout.INGEST).num_rows == made["kept"]
