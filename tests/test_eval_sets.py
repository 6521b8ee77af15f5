"""Every test set in ../shared/data/eval_sets loads with its published count."""

from __future__ import annotations

from pathlib import Path

import pytest

from gleaner.tasks.evaluate.answers import AnswerFileError, load_answers
from gleaner.tasks.evaluate.eval_sets import EvalSetError, load_eval_set

COUNTS = {"koala": 180, "vicuna": 80, "wizardlm": 218, "sinstruct": 252, "mt_bench": 80}


@pytest.mark.parametrize(("name", "count"), sorted(COUNTS.items()))
def test_known_sets_load_with_their_counts(shared_data: Path, name: str, count: int) -> None:
    prompts = load_eval_set(name, str(shared_data / "eval_sets"))
    assert len(prompts) == count
    assert len({p.id for p in prompts}) == count  # ids are unique within a set
    assert all(p.test_set == name and p.instruction.strip() for p in prompts)


def test_fields_are_read_from_each_format(shared_data: Path) -> None:
    folder = str(shared_data / "eval_sets")
    vicuna = load_eval_set("vicuna", folder, limit=1)[0]
    assert (vicuna.id, vicuna.question) == ("1", "How can I improve my time management skills?")
    wizard = load_eval_set("wizardlm", folder, limit=1)[0]
    assert wizard.question.startswith("If a car travels 120 miles in 2 hours")
    mt = load_eval_set("mt-bench", folder, limit=1)[0]
    assert mt.id == "81" and mt.question.startswith("Compose an engaging travel blog post")
    assert "Rewrite your previous response" not in mt.question  # first turn only
    sinstruct = load_eval_set("self-instruct", folder, limit=1)[0]
    assert sinstruct.input.startswith("If you have any questions about my rate")
    assert sinstruct.question == f"{sinstruct.instruction}\n\n{sinstruct.input}"
    koala = load_eval_set("koala", folder, limit=3)
    assert [p.id for p in koala] == ["koala_0", "koala_1", "koala_2"]


def test_any_prompt_jsonl_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two", "id": 7}\n{"prompt": "three"}\n')
    prompts = load_eval_set(str(path))
    assert [(p.test_set, p.id, p.question) for p in prompts] == [
        ("mine", "1", "one"), ("mine", "7", "two"), ("mine", "4", "three")]
    assert len(load_eval_set(f"custom={path}", limit=2)) == 2
    assert load_eval_set(f"custom={path}")[0].test_set == "custom"


def test_bad_rows_name_file_line_and_field(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(EvalSetError, match=r"bad\.jsonl, line 2: field 'prompt'"):
        load_eval_set(str(path))
    path.write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(EvalSetError, match=r"line 2: not valid JSON"):
        load_eval_set(str(path))
    with pytest.raises(EvalSetError, match="file not found"):
        load_eval_set(str(tmp_path / "missing.jsonl"))
    monkeypatch.delenv("GLEANER_EVAL_SETS", raising=False)
    with pytest.raises(EvalSetError, match="not shipped with gleaner.*test_sets_dir"):
        load_eval_set("wizardlm", None)  # non-commercial terms: the user's folder only


def test_answer_files_validate_fields(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text('{"prompt": "Q", "answer": "A", "id": 3}\n'
                    '{"instruction": "Q2", "output": "A2", "dataset": "vicuna"}\n')
    rows = load_answers(str(path))
    assert [(r.prompt, r.answer, r.id, r.test_set) for r in rows] == [
        ("Q", "A", "3", None), ("Q2", "A2", None, "vicuna")]
    path.write_text('{"prompt": "Q"}\n')
    with pytest.raises(AnswerFileError, match=r"line 1: missing field 'answer'"):
        load_answers(str(path))
    path.write_text('{"prompt": "Q", "answer": ["list"]}\n')
    with pytest.raises(AnswerFileError, match=r"field 'answer' must be a string"):
        load_answers(str(path))


def test_the_shipped_sets_are_the_upstream_files_and_load_with_no_folder(monkeypatch,
                                                                         shared_data) -> None:
    """koala, sinstruct and MT-Bench (questions and GPT-4 references) ship with the package,
    byte for byte the files of their upstream repositories, named in its NOTICE."""
    from gleaner.config import GleanerConfig
    from gleaner.tasks.evaluate.eval_sets import SHIPPED, load_eval_set
    from gleaner.tasks.mtbench.questions import load_questions

    monkeypatch.delenv("GLEANER_EVAL_SETS", raising=False)
    notice = (SHIPPED / "NOTICE").read_text()
    for name in ("koala_test_set.jsonl", "sinstruct_test_set.jsonl", "mt_bench_question.jsonl",
                 "mt_bench/reference_answer_gpt-4.jsonl"):
        assert (SHIPPED / name).read_bytes() == (shared_data / "eval_sets" / name).read_bytes()
        assert name in notice
    assert "Apache License" in (SHIPPED / "LICENSE-Apache-2.0.txt").read_text()
    assert len(load_eval_set("koala")) == 180 and len(load_eval_set("sinstruct")) == 252
    questions = load_questions(GleanerConfig())
    assert len(questions) == 80 and sum(q.references is not None for q in questions) == 30
    assert GleanerConfig().evaluate.test_sets == ["koala"]  # the default resolves anywhere


def test_doctor_passes_the_default_test_set_with_no_folder(monkeypatch) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.flows.doctor import check_test_sets

    monkeypatch.delenv("GLEANER_EVAL_SETS", raising=False)
    [check] = check_test_sets(GleanerConfig())
    assert (check.name, check.status) == ("test-set:koala", "ok")
    assert check.detail.startswith("180 prompts in ") and "tasks/evaluate/data" in check.detail
    [vicuna] = check_test_sets(GleanerConfig().with_overrides({"evaluate.test_sets": ["vicuna"]}))
    assert vicuna.status == "failed" and "CC-BY-NC-4.0" in vicuna.detail  # says why, and where
