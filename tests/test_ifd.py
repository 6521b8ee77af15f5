"""IFD (Cherry LLM / Superfiltering) and Long-is-more: the signals equal a direct computation,
the selectors pick what their papers define, and both stages run on the engine (Ray actors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gleaner.schema import Example, Turn
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)


def examples(shared_data: Path) -> list[dict]:
    """Real Alpaca rows (with and without input), a LIMA-style multi-turn one, an empty one."""
    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())
    with_input = next(r for r in rows if r["input"])
    plain = [r for r in rows if not r["input"]][:2]
    plain.append(max(rows[:300], key=lambda r: len(r["output"])))  # longer than max_length
    out = [Example("alpaca", i, r["instruction"], r["input"], r["output"]).to_row()
           for i, r in enumerate([with_input, *plain])]
    out.append(Example("lima", 9, "And in French?", "", "Bonjour le monde.",
                       history=[Turn("user", "Say hello world."),
                                Turn("assistant", "Hello world.")]).to_row())
    out.append(Example("alpaca", 10, "Say nothing.", "", "").to_row())
    return out


def direct_losses(model_dir: Path, example: dict, max_length: int
                  ) -> tuple[float, float, bool]:
    """L(A|Q) and L(A) of one example by plain transformers calls: one unpadded sequence each,
    labels -100 before the answer, the model's own causal-LM loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gleaner.tasks.ifd.loss import question_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = [tok.bos_token_id]
    prompt = tok.encode(question_prompt(example), add_special_tokens=False)
    whole = tok.encode(example["output"], add_special_tokens=False)
    answer = whole[:max_length - 1 - len(prompt)]
    losses = []
    for head in (start + prompt, start):
        ids = torch.tensor([head + answer])
        labels = ids.clone()
        labels[0, :len(head)] = -100
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return losses[0], losses[1], len(answer) < len(whole)


def test_ifd_equals_plain_transformers_computation(tiny_model_dir: Path, shared_data: Path):
    from gleaner.tasks.ifd.loss import IFDScorer

    rows = examples(shared_data)
    # batches of 3 with padding; max_length cuts the long answers (both readings alike)
    scorer = IFDScorer(str(tiny_model_dir), device="cpu", batch_size=3, max_length=96)
    scores = scorer.score(rows)
    assert scores[-1].ifd is None and "empty" in scores[-1].error  # nothing to score
    truncated = []
    for row, score in zip(rows[:-1], scores[:-1], strict=True):
        conditioned, alone, cut = direct_losses(tiny_model_dir, row, 96)
        truncated.append(cut)
        assert score.truncated == cut
        assert score.loss_conditioned == pytest.approx(conditioned, rel=1e-5, abs=1e-6)
        assert score.loss_alone == pytest.approx(alone, rel=1e-5, abs=1e-6)
        assert score.ifd == pytest.approx(conditioned / alone, rel=1e-5)
    assert any(truncated) and not all(truncated)
    # the multi-turn example is scored on its final answer, the earlier turns being the question
    from gleaner.tasks.ifd.loss import question_prompt

    assert "Say hello world." in question_prompt(rows[4]) and "And in French?" in \
        question_prompt(rows[4])


def test_ifd_selector_drops_above_one_ranks_and_keeps_a_fraction():
    from gleaner.tasks.select.selectors import Candidates, SelectRequest, run_selector

    ids = [f"e{i:02d}" for i in range(10)]
    ifd = np.array([0.2, 1.3, 0.9, np.nan, 0.95, 1.0, 0.5, 1.01, 0.9, 0.1])
    data = Candidates(ids, {"ifd": ifd})
    manifest = run_selector(data, "ifd", SelectRequest(None, 0, 0.9, None, 0, fraction=0.3))
    # 30 % of 10 = 3; IFD 1.0 is kept (only > 1 is dropped); ties (0.9) broken by id
    assert manifest.selected_ids == ["e05", "e04", "e02"]
    assert manifest.counts() == {"kept": 3, "below_threshold": 0, "above_threshold": 2,
                                 "too_similar": 0, "over_budget": 4, "failed_upstream": 1,
                                 "contaminated": 0, "near_duplicate": 0}
    assert [manifest.reason[i] for i in (1, 7, 3)] == ["above_threshold"] * 2 + [
        "failed_upstream"]


def test_longest_picks_exactly_the_longest(tokenizer, smol_tokenizer_dir: Path,
                                           shared_data: Path):
    from gleaner.config import LengthConfig
    from gleaner.tasks.length.stage import LengthWorker, responses
    from gleaner.tasks.select.selectors import Candidates, SelectRequest, run_selector

    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:60]
    table_rows = [Example("alpaca", i, r["instruction"], r["input"], r["output"]).to_row()
                  for i, r in enumerate(rows)]
    import pyarrow as pa

    worker = LengthWorker(LengthConfig(tokenizer=str(smol_tokenizer_dir)))
    lengths = worker.process(pa.Table.from_pylist(table_rows)).to_pylist()
    ids = [r["id"] for r in table_rows]
    tokens = [len(tokenizer.encode(r["output"], add_special_tokens=False)) for r in rows]
    assert [x["response_tokens"] for x in lengths] == tokens
    assert [x["response_chars"] for x in lengths] == [len(r["output"]) for r in rows]
    assert responses(table_rows[0]["conversation"], "") == [rows[0]["output"]]
    data = Candidates(ids, {"response_tokens": np.array(tokens, float),
                            "response_chars": np.array([len(r["output"]) for r in rows], float)})
    for column, values in (("response_tokens", tokens),
                           ("response_chars", [len(r["output"]) for r in rows])):
        picked = run_selector(data, "longest", SelectRequest(
            column if column == "response_chars" else None, 7, 0.9, None, 0))
        expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-values[i], ids[i]))]
        assert picked.selected_ids == expected[:7]
        assert min(values[ids.index(i)] for i in picked.selected_ids) >= max(
            values[ids.index(i)] for i in ids if i not in picked.selected_ids)
        assert picked.counts()["over_budget"] == len(ids) - 7


@pytest.mark.slow
def test_ifd_and_length_stages_on_the_engine_then_select(prefect_api, ray_local,
                                                         tiny_model_dir: Path,
                                                         shared_data: Path, tmp_path: Path):
    """Both stages as flows on Ray actors: one row per example (the empty response a failed
    row with its reason), cached for the next run; the ifd and longest selectors read them."""
    import pyarrow as pa

    from gleaner import layout
    from gleaner.config import GleanerConfig
    from gleaner.flows.signal_flows import ifd_flow, length_flow
    from gleaner.schema import EXAMPLE_SCHEMA
    from gleaner.store import Store
    from gleaner.tasks.ifd.loss import IFDScorer
    from gleaner.tasks.select.stage import select_examples

    rows = examples(shared_data)
    store = Store(str(tmp_path / "store"))
    for run in ("r1", "r2"):
        store.write_part(run, layout.INGEST, 0, pa.Table.from_pylist(rows, EXAMPLE_SCHEMA))
    config = GleanerConfig().with_overrides({
        "store.url": str(tmp_path / "store"), "ifd.model": str(tiny_model_dir),
        "ifd.max_length": 96, "ifd.resources.batch_size": 4, "ifd.max_failed_share": 0.5,
        "length.tokenizer": str(tiny_model_dir)})
    summary = ifd_flow(run_id="r1", config=config)
    assert (summary["ok"], summary["failed"], summary["failures"]) == (5, 1, {"input": 1})
    assert summary["batches"] == 2
    assert summary["devices"] == {"cpu float32": 2}  # where the model ran, in what dtype
    table = store.read_stage("r1", layout.IFD).to_pylist()
    by_id = {r["id"]: r for r in table}
    expected = IFDScorer(str(tiny_model_dir), "cpu", 8, 96).score(rows)
    for row, score in zip(rows, expected, strict=True):
        stored = by_id[row["id"]]
        if score.ifd is None:
            assert stored["status"] == "failed" and "empty" in stored["error"]
        else:
            assert stored["ifd"] == pytest.approx(score.ifd, rel=1e-5)
    again = ifd_flow(run_id="r2", config=config)  # another run, same settings: the cache
    assert again["cached"] == 5 and again["made"] == 1
    lengths = length_flow(run_id="r1", config=config)
    assert lengths["ok"] == 6 and lengths["failed"] == 0

    ifd_config = config.with_overrides({"select.selector": "ifd", "select.fraction": 0.5})
    picked, _, _ = select_examples(store, "r1", ifd_config)
    values = [r["ifd"] for r in table if r["status"] == "ok"]
    assert picked["selected"] == min(3, sum(v <= 1 for v in values))  # 50 % of 6, IFD <= 1
    assert picked["reasons"]["above_threshold"] == sum(v > 1 for v in values)
    assert picked["reasons"]["failed_upstream"] == 1
    longest_config = config.with_overrides({"select.selector": "longest", "select.size": 2})
    picked, _, _ = select_examples(store, "r1", longest_config)
    manifest = store.read_stage("r1", layout.SELECT)
    chosen = set(manifest.filter(manifest["selected"]).column("id").to_pylist())
    tokens = {r["id"]: r["response_tokens"] for r in store.read_stage("r1", layout.LENGTH)
              .to_pylist()}
    assert chosen == set(sorted(tokens, key=lambda i: (-tokens[i], i))[:2])
    assert store.read_stage("r1", layout.CURATED, schema=EXAMPLE_SCHEMA).num_rows == 2
