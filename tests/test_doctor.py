"""``gleaner doctor`` as a person runs it (a subprocess: real exit codes) against real parts:
the session's Prefect server, a loopback OpenAI-compatible server, local folders and moto S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gleaner.config import EndpointConfig, GleanerConfig
from gleaner.flows.doctor import Check, check_endpoint, check_packages, exit_code
from tests.support.openai_server import OpenAIStub, Reply, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "GLEANER_DOCTOR_TEST_KEY"
SECRET = "sk-doctor-test-0123456789abcdef"
# the lines that depend on this machine's install, not on the services under test
MACHINE = {"python", "packages", "llama.cpp"}


def with_logprobs(body: dict[str, Any]) -> Reply:
    return Reply(content="5", top_logprobs=[{"5": -0.2, "4": -1.8, "3": -3.0}])


def without_logprobs(body: dict[str, Any]) -> Reply:
    return Reply(content="5")


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(with_logprobs) as server:
        yield server


def write_config(tmp_path: Path, shared_data: Path, endpoint: str, **sections: Any) -> Path:
    """rater (score-only) and judge at ``endpoint``: the offline default is not needed."""
    document: dict[str, Any] = {
        "store": {"url": str(tmp_path / "store")},
        "rate": {"mode": "score-only",
                 "endpoint": {"base_url": endpoint, "model": "stub-model",
                              "api_key_env": KEY_ENV, "max_retries": 0}},
        "evaluate": {"endpoint": {"base_url": endpoint, "model": "stub-model",
                               "api_key_env": KEY_ENV, "max_retries": 0},
                     "test_sets": ["vicuna"], "test_sets_dir": str(shared_data / "eval_sets")},
    }
    for section, values in sections.items():
        document.setdefault(section, {}).update(values)
    path = tmp_path / "gleaner.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def doctor(config: Path, *args: str, prefect_api: str | None = None,
           as_json: bool = True) -> tuple[subprocess.CompletedProcess[str], dict[str, Check]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env[KEY_ENV] = SECRET
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    command = [sys.executable, "-m", "gleaner.flows.cli", "doctor", "--config", str(config),
               *args, *(["--json"] if as_json else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT,
                            env=env, check=False)
    assert SECRET not in result.stdout + result.stderr  # the key is never printed
    if not as_json:
        return result, {}
    document = json.loads(result.stdout)  # stdout is exactly one JSON object
    checks = {c["name"]: Check(**c) for c in document["checks"]}
    assert document["ok"] is (result.returncode == 0), result.stdout
    return result, checks


def assert_only(checks: dict[str, Check], expected: dict[str, str]) -> None:
    """The named lines have the expected status; every other service line is ok."""
    for name, check in checks.items():
        if name in expected:
            assert check.status == expected[name], check
        elif name in MACHINE:
            assert check.status != "failed", check
        else:
            assert check.status == "ok", check


def test_healthy_local_stack(tmp_path, shared_data, prefect_api, stub):
    config = write_config(tmp_path, shared_data, stub.base_url,
                          prefect={"api_url": prefect_api})
    result, checks = doctor(config)
    assert result.returncode == 0, result.stdout
    assert_only(checks, {})
    assert {"python", "packages", "llama.cpp", "prefect-api", "ray", "store", "rater", "judge",
            "test-set:vicuna"} <= set(checks)
    assert "answers (Prefect 3." in checks["prefect-api"].detail
    assert "returns logprobs" in checks["rater"].detail
    assert checks["rater"].info["models"] == ["stub-model"]
    assert checks["test-set:vicuna"].detail.startswith("80 prompts in ")
    assert "write, read back, delete" in checks["store"].detail
    assert not checks["llama.cpp"].needed  # both roles have an endpoint
    # the probe object is gone, and so is the store folder the doctor had to create
    assert not (tmp_path / "store").exists()
    # the rater was asked for one token with logprobs
    asked = [r for r in stub.requests if r.get("logprobs")]
    assert asked and all(r["max_tokens"] == 1 for r in asked)


def test_stopped_prefect_api_fails_its_line(tmp_path, shared_data, stub):
    dead = f"http://127.0.0.1:{free_port()}/api"
    config = write_config(tmp_path, shared_data, stub.base_url, prefect={"api_url": dead})
    result, checks = doctor(config)
    assert result.returncode == 1
    assert_only(checks, {"prefect-api": "failed"})
    assert checks["prefect-api"].needed
    assert "prefect server start" in checks["prefect-api"].fix
    # the human report: one FAILED line with what to do, and the same exit code
    human, _ = doctor(config, as_json=False)
    assert human.returncode == 1
    line = next(ln for ln in human.stdout.splitlines() if "prefect-api" in ln)
    assert line.startswith("FAILED   prefect-api")
    assert f"{dead} does not answer — start it (prefect server start)" in line
    assert "1 needed check failed" in human.stdout


def test_unwritable_store_fails_its_line(tmp_path, shared_data, stub):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file: nothing can be created under it, even by root\n")
    config = write_config(tmp_path, shared_data, stub.base_url,
                          store={"url": str(blocker / "store")})
    result, checks = doctor(config)
    assert result.returncode == 1
    assert_only(checks, {"store": "failed"})
    assert str(blocker / "store") in checks["store"].detail
    assert "--store" in checks["store"].fix


def test_endpoint_without_logprobs_warns_in_score_only_mode(tmp_path, shared_data):
    with OpenAIStub(without_logprobs) as plain:
        config = write_config(tmp_path, shared_data, plain.base_url)
        result, checks = doctor(config)
    assert result.returncode == 0, result.stdout
    assert_only(checks, {"rater": "warning"})
    assert "returns no logprobs" in checks["rater"].detail
    assert "falls back to explain" in checks["rater"].detail
    # the judge does not need logprobs: ok, saying so
    assert "returns no logprobs" in checks["judge"].detail


def test_s3_store_on_moto(tmp_path, shared_data, stub, s3):
    config = write_config(tmp_path, shared_data, stub.base_url,
                          store={"url": s3["url"], "options": {"endpoint_url": s3["endpoint_url"]}})
    result, checks = doctor(config)
    assert result.returncode == 0, result.stdout
    assert_only(checks, {})
    assert checks["store"].detail.startswith(f"{s3['url']} (endpoint {s3['endpoint_url']})")
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]},
                           skip_instance_cache=True)
    assert not fs.find(s3["bucket"])  # the probe object was deleted


# ---- single checks, in process -------------------------------------------------------------
def test_rejected_key_fails_unless_the_role_is_not_needed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with OpenAIStub(lambda body: Reply(status=401, error_message="bad key")) as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="stub-model",
                                  api_key_env=KEY_ENV, max_retries=0)
        needed = check_endpoint("judge", "evaluate.endpoint", endpoint, needed=True)
        spare = check_endpoint("judge", "evaluate.endpoint", endpoint, needed=False,
                               unused="curate.evaluate is off")
    assert needed.status == "failed" and needed.info["error"] == "rejected_key"
    assert KEY_ENV in needed.fix and SECRET not in needed.detail + needed.fix
    assert spare.status == "warning" and "curate.evaluate is off" in spare.detail
    assert exit_code([needed]) == 1 and exit_code([spare]) == 0


def test_packages_against_the_lock(tmp_path):
    config = GleanerConfig()
    assert check_packages(config, tmp_path / "no-lock.txt").status == "warning"
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a lock\nprefect==0.0.1\nray==0.0.2 ; python_version >= '3.11'\n")
    check = check_packages(config, lock)
    assert check.status == "warning" and not check.needed
    assert "prefect" in check.detail and "(lock 0.0.1)" in check.detail
    assert "infra/install.sh" in check.fix
