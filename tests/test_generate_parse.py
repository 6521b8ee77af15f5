"""Self-instruct's request, parse and filters, against Alpaca's generator (stanford_alpaca)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gleaner.tasks.generate.filters import task_filter
from gleaner.tasks.generate.parse import parse_answer, strip_echo
from gleaner.tasks.generate.prompt import ALPACA_PROMPT_FILE, load_prompt
from gleaner.tasks.generate.seeds import SeedError, Task, load_seed_tasks


def test_the_prompt_is_stanford_alpacas_prompt_txt_verbatim(shared_data: Path) -> None:
    assert ALPACA_PROMPT_FILE.read_bytes() == (shared_data / "alpaca_seed/prompt.txt").read_bytes()


def test_a_request_is_encoded_as_alpacas_encode_prompt() -> None:
    prompt = load_prompt()
    tasks = [Task("Give  three\ttips for staying healthy:", "", "1. Eat well."),
             Task("Translate to French.", "Good morning", "Bonjour")]
    text = prompt.encode(tasks)
    assert text == (prompt.text + "\n"
                    "###\n1. Instruction: Give three tips for staying healthy\n"
                    "1. Input:\n<noinput>\n1. Output:\n1. Eat well.\n"
                    "###\n2. Instruction: Translate to French.\n2. Input:\nGood morning\n"
                    "2. Output:\nBonjour\n###\n3. Instruction:")


def test_seed_tasks_are_the_175_with_their_first_instance(shared_data: Path) -> None:
    seeds = load_seed_tasks(str(shared_data / "alpaca_seed/seed_tasks.jsonl"), minimum=3)
    lines = [json.loads(x) for x in (shared_data / "alpaca_seed/seed_tasks.jsonl").open()]
    assert len(seeds) == 175
    assert seeds[1] == Task(lines[1]["instruction"], lines[1]["instances"][0]["input"],
                            lines[1]["instances"][0]["output"])


def test_a_broken_seed_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "a b c d", "instances": [{"input": "", "output": "x"}]}\n'
                    '{"instruction": "no instances"}\n')
    with pytest.raises(SeedError, match="seeds.jsonl, line 2: no 'instances'"):
        load_seed_tasks(str(path))
    path.write_text('{"instruction": "a b c d", "instances": [{"input": "", "output": "x"}]}\n')
    with pytest.raises(SeedError, match="holds 1 seed task"):
        load_seed_tasks(str(path), minimum=3)


def task(k: int, instruction: str, given: str = "<noinput>", output: str = "An answer.") -> str:
    return f"{k}. Instruction: {instruction}\n{k}. Input:\n{given}\n{k}. Output:\n{output}\n"


def answer(*pieces: str) -> str:
    """What a model returns: the list after the request's '4. Instruction:'."""
    return "###\n".join(pieces).removeprefix("4. Instruction:")


def test_the_parse_reads_numbered_tasks_and_names_what_it_drops() -> None:
    text = answer(task(4, "Name three rivers in Africa.", "", "Nile, Congo, Niger."),
                  task(5, "Classify the sentiment of the review.", "I loved it", "Positive"),
                  task(7, "This one skips a number in the list.") ,  # broken numbering
                  "7. Instruction: Only an instruction, no input nor output.\n",
                  task(8, "A good one after the broken ones."),
                  "\n")
    got = parse_answer(text, 3, "stop")
    assert [(c.position, c.reason) for c in got] == [
        (4, None), (5, None), (6, "malformed"), (7, "malformed"), (8, None)]
    assert (got[1].instruction, got[1].input, got[1].output) == (
        "Classify the sentiment of the review.", "I loved it", "Positive")
    assert got[0].input == ""  # <noinput> and empty both mean no input


def test_the_last_task_of_an_answer_cut_by_length_is_dropped_as_length_cut() -> None:
    text = answer(task(4, "Name three rivers in Africa."),
                  "5. Instruction: Write a limerick about a cat\n5. Input:\n<noinput>\n5. Ou")
    got = parse_answer(text, 3, "length")
    assert [(c.position, c.reason) for c in got] == [(4, None), (5, "length_cut")]
    # the same text, finished: its last piece is malformed, not cut
    assert [c.reason for c in parse_answer(text, 3, "stop")] == [None, "malformed"]


def test_a_chat_models_echo_of_the_next_number_is_dropped_once() -> None:
    text = "4. Instruction: Name three rivers.\n4. Input:\n<noinput>\n4. Output:\nNile"
    assert strip_echo(text, 4).startswith(" Name three rivers.")
    assert [c.reason for c in parse_answer(strip_echo(text, 4), 3, "stop")] == [None]


@pytest.mark.parametrize(("instruction", "output", "reason"), [
    ("Sort these numbers.", "x", "too_short"),  # 3 words: Alpaca drops <= 3
    ("Sort these four numbers.", "x", None),
    (" ".join(["word"] * 151), "x", "too_long"),
    (" ".join(["word"] * 150), "x", None),
    ("Describe the image of a sunset over the sea.", "x", "blacklisted"),
    ("Describe the IMAGES of a sunset over the sea.", "x", "blacklisted"),  # any case
    ("Describe the imagery of a sunset over the sea.", "x", None),  # a word, not a substring
    ("Tell me how to go to the nearest station.", "x", "blacklisted"),  # two-word entry
    ("Write a program that prints prime numbers.", "x", "write_a_program"),
    ("Write a poem that mentions prime numbers.", "x", None),
    ('"Quote" this sentence in a formal tone.', "x", "starts_with_punctuation"),
    ("Ünderline the verbs of this sentence please.", "x", "starts_non_ascii"),
    ("Name three famous painters of the Renaissance.", " ", "empty_output"),
])
def test_alpacas_filters_each_with_its_reason(instruction: str, output: str,
                                              reason: str | None) -> None:
    assert task_filter(instruction, output) == reason


def test_an_extra_blacklist_word_filters_too() -> None:
    assert task_filter("Summarise this spreadsheet for me.", "x", ["spreadsheet"]) == \
        "blacklisted"
