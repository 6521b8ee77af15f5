"""The curate flow checks its evaluation inputs before ingesting (fast: no models are loaded).

Evaluation is the last stage; a test set that does not resolve (the demo's relative
``test_sets_dir`` read from another directory) must stop the run at once, naming the config
key, the path, and that relative paths are resolved against the current directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gleaner.config import GleanerConfig, load_config
from gleaner.flows.curate import check_evaluation_inputs, curate_flow
from gleaner.tasks.evaluate.eval_sets import EvalSetError, check_readable
from tests.support.curate_run import gleaner_command
from tests.support.pipeline import ALPACA_SAMPLE, ROOT, prefect_env

DEMO = ROOT / "examples" / "offline-demo.yaml"


def test_demo_config_from_another_directory_fails_before_anything_runs(
    tmp_path: Path,
) -> None:
    """The user's path: `gleaner curate` with the demo config, started outside the checkout."""
    store = tmp_path / "store"
    env = prefect_env("http://127.0.0.1:9/api")  # unreachable: nothing may get that far
    env.pop("GLEANER_EVAL_SETS", None)
    result = subprocess.run(
        [*gleaner_command(), "curate", str(ALPACA_SAMPLE), "--config", str(DEMO),
         "--store", str(store), "--run-id", "preflight", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr
    assert "gleaner: error: evaluate.test_sets_dir = '../shared/data/eval_sets'" in error
    assert "../shared/data/eval_sets/vicuna_test_set.jsonl is not a readable file" in error
    assert f"relative paths are resolved against the current directory ({tmp_path})" in error
    assert "Traceback" not in error
    assert result.stdout == ""
    assert not store.exists()  # nothing ingested, no run record


def test_the_same_config_from_the_checkout_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    check_evaluation_inputs(load_config(DEMO))


def test_the_flow_itself_fails_before_ingesting(prefect_api: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment run has no CLI around it: the flow checks too, before Ray and ingest."""
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO).with_overrides({"store.url": str(tmp_path / "store")})
    with pytest.raises(EvalSetError, match=r"evaluate\.test_sets_dir.*current directory"):
        curate_flow(sources=[str(ALPACA_SAMPLE)], config=config, run_id="preflight-flow")
    assert not (tmp_path / "store").exists()  # no run record, no ingest


def test_what_is_checked_and_when(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  shared_data: Path) -> None:
    monkeypatch.delenv("GLEANER_EVAL_SETS", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = str(shared_data / "eval_sets")
    check_readable(["vicuna", "koala", "self-instruct"], folder)  # all there: no error
    # An explicit path entry names evaluate.test_sets; an absolute path gets no cwd hint.
    missing = tmp_path / "mine.jsonl"
    with pytest.raises(EvalSetError) as caught:
        check_readable(["vicuna", f"mine={missing}"], folder)
    assert f"evaluate.test_sets entry 'mine={missing}': {missing} is not a readable" \
        in str(caught.value)
    assert "current directory" not in str(caught.value)
    # A folder where a file should be is not readable either.
    (tmp_path / "vicuna_test_set.jsonl").mkdir()
    with pytest.raises(EvalSetError, match=r"evaluate\.test_sets_dir = '\.'"):
        check_readable(["vicuna"], ".")
    # A known set with no folder: the copies shipped with gleaner, where the licence allows;
    # Vicuna's questions are non-commercial, so it needs a folder, and the error says why.
    monkeypatch.delenv("GLEANER_EVAL_SETS", raising=False)
    check_readable(["koala", "sinstruct", "mt_bench"], None)
    with pytest.raises(EvalSetError, match=r"evaluate\.test_sets: .*not shipped with gleaner "
                                           r"\(its questions are CC-BY-NC-4\.0.*"
                                           r"evaluate\.test_sets_dir"):
        check_readable(["vicuna"], None)
    monkeypatch.setenv("GLEANER_EVAL_SETS", "nowhere")
    with pytest.raises(EvalSetError, match=r"\$GLEANER_EVAL_SETS = 'nowhere'.*current directory"):
        check_readable(["koala"], None)
    monkeypatch.setenv("GLEANER_EVAL_SETS", folder)
    check_readable(["koala"], None)
    # Only when this flow evaluates: not with --no-eval, not when a deployment does it.
    bad = GleanerConfig().with_overrides({"evaluate.test_sets_dir": "nowhere"})
    with pytest.raises(EvalSetError):
        check_evaluation_inputs(bad)
    check_evaluation_inputs(bad.with_overrides({"curate.evaluate": False}))
    check_evaluation_inputs(bad.with_overrides({"curate.downstream": "event"}))
    assert os.getcwd() == str(tmp_path)
