"""``gleaner ingest`` as a user runs it (the installed console script, in a subprocess) and the
ingest Prefect flow against the session's real Prefect API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gleaner.config import GleanerConfig
from gleaner.runs import read_run
from gleaner.store import Store

ROOT = Path(__file__).resolve().parents[1]


def gleaner(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("gleaner", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "gleaner.flows.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ), check=False)


def test_ingest_json_prints_one_object(tmp_path, shared_data, prefect_api):
    store = tmp_path / "store"
    result = gleaner("ingest", str(shared_data / "dolly" / "dolly_3k.json"),
                     str(shared_data / "lima" / "lima.json"),
                     "--store", str(store), "--run-id", "cli-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert summary["run_id"] == "cli-run"
    assert (summary["read"], summary["kept"], summary["quarantined"], summary["duplicates"]) == (
        2996 + 1029, 2994 + 1029, 0, 2)
    assert [s["format"] for s in summary["sources"]] == ["alpaca", "lima"]
    assert [s["duplicates"] for s in summary["sources"]] == [2, 0]
    assert read_run(Store(str(store)), "cli-run")["ingest"]["kept"] == summary["kept"]


def test_ingest_human_summary_names_reasons(tmp_path, prefect_api):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "c"}\n')
    result = gleaner("ingest", str(source), "--store", str(tmp_path / "store"),
                     "--run-id", "human", "--format", "alpaca")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "read 2 = kept 1 + quarantined 1 + duplicates 0" in out
    assert "not_a_string 1" in out
    assert f"{source}:2 [instruction]" in out


def test_missing_file_exits_non_zero_naming_it(tmp_path):
    missing = tmp_path / "no-such-file.json"
    result = gleaner("ingest", str(missing), "--store", str(tmp_path / "store"), "--json",
                     timeout=60)
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "store" / "runs").exists()


def test_bad_format_flag_is_refused(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n')
    result = gleaner("ingest", str(source), "--store", str(tmp_path / "s"), "--format", "yaml",
                     timeout=60)
    assert result.returncode != 0 and "ingest.format" in result.stderr


def test_ingest_flow_runs_on_prefect_and_publishes_its_summary(tmp_path, shared_data, prefect_api):
    import httpx

    from gleaner.artifacts import artifact_key
    from gleaner.flows.ingest_flow import ingest_flow

    config = GleanerConfig()
    config.store.url = str(tmp_path / "store")
    state = ingest_flow([str(shared_data / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json")],
                        run_id="Flow_Run.1", config=config, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert (summary["kept"], summary["duplicates"]) == (985, 14)

    response = httpx.post(  # the REST API the UI reads artifacts from
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [artifact_key("ingest", "Flow_Run.1")]}}, "limit": 10},
        timeout=30,
    )
    response.raise_for_status()
    (artifact,) = response.json()
    assert artifact["key"] == "ingest-flow-run-1"
    assert "duplicates **14**" in artifact["data"]


@pytest.mark.parametrize("run_id", ["Run_2024.01", "--weird--"])
def test_artifact_keys_are_valid(run_id):
    from gleaner.artifacts import artifact_key

    key = artifact_key("ingest", run_id)
    assert key.startswith("ingest-") and set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
