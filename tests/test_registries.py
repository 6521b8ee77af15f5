"""Extension points are registries: a selector in one file with one registration line runs
through `gleaner select`; config and CLI choices come from the registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gleaner.config import GleanerConfig
from gleaner.registry import registry
from gleaner.schema import Example, examples_to_table
from gleaner.store import Store

ROOT = Path(__file__).resolve().parents[1]
TOY_SELECTOR = '''"""A toy selector: the examples whose ids sort first (stands in for a rule)."""

import numpy as np

from gleaner.registry import register
from gleaner.tasks.select.selectors import Selector, select_topk


def first_ids(data, request):
    order = np.argsort(np.array(data.ids, dtype=object))
    rank = np.empty(len(data.ids))
    rank[order] = np.arange(len(data.ids))
    return select_topk(data.ids, -rank, request.budget)


register("selector", "first-ids")(Selector(first_ids))
'''


def test_built_in_entries_are_registered() -> None:
    assert {"deita", "threshold", "topk", "random"} <= set(registry("selector").names())
    assert {"explain", "score-only"} <= set(registry("rater").names())
    assert {"hf", "endpoint"} <= set(registry("scorer").names())
    assert {"koala", "vicuna", "wizardlm", "sinstruct", "mt_bench"} <= set(
        registry("eval_set").names())
    assert {"alpaca", "jsonl", "parquet", "sharegpt"} <= set(registry("export_format").names())
    assert {"rating", "complexity", "quality", "evol"} <= set(registry("signal").names())


def selectors() -> list[str]:
    return registry("selector").names()


def test_config_refuses_an_unknown_choice_naming_the_known_ones() -> None:
    with pytest.raises(ValueError,
                       match=rf"unknown selector 'nope'; known: {', '.join(selectors())}"):
        GleanerConfig().with_overrides({"select.selector": "nope"})


def test_a_selector_plugin_runs_through_gleaner_select(prefect_api, tmp_path: Path) -> None:
    plugin = tmp_path / "plugins" / "toy_selector.py"
    plugin.parent.mkdir()
    plugin.write_text(TOY_SELECTOR)
    store = Store(str(tmp_path / "store"))
    pool = [Example("toy", i, f"instruction {i}", output="y") for i in range(12)]
    store.write_part("plug", "ingest", 0, examples_to_table(pool))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "GLEANER_PLUGINS": "toy_selector",
           "PYTHONPATH": f"{plugin.parent}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-m", "gleaner.flows.cli", "select", "--run-id", "plug", "--store",
         store.url, "--selector", "first-ids", "--budget", "3", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["selector"] == "first-ids" and summary["selected"] == 3
    manifest = store.read_stage("plug", "select").to_pylist()
    assert {r["id"] for r in manifest if r["selected"]} == set(sorted(e.id for e in pool)[:3])
    assert sum(r["reason"] == "over_budget" for r in manifest) == 9
    # without the plugin the name is refused, with the known names listed
    env.pop("GLEANER_PLUGINS")
    refused = subprocess.run(
        [sys.executable, "-m", "gleaner.flows.cli", "select", "--run-id", "plug", "--store",
         store.url, "--selector", "first-ids"], env=env, capture_output=True, text=True,
        timeout=300)
    assert refused.returncode == 2
    assert f"one of {', '.join(selectors())}, not 'first-ids'" in refused.stderr
