"""Test-set loaders: Koala, Vicuna, WizardLM, Self-Instruct, MT-Bench (first turns), any JSONL.

Every loader yields the same record, :class:`EvalPrompt`: the instruction and
(for Self-Instruct) the instance input kept apart so a fine-tuned model gets
them in its own prompt template, and ``question`` = what the judge reads.
A named set resolves to ``<test_sets_dir>/<file>`` (``evaluate.test_sets_dir``, else
``$GLEANER_EVAL_SETS``), else to the copy shipped in this package (``data/``: the sets
whose licences allow it, named in ``data/NOTICE``; Vicuna's and WizardLM's carry
non-commercial terms and are not shipped); anything else is a path or fsspec URL of a
JSONL file whose rows hold a ``prompt`` field (an ``id`` is optional). Bad rows stop
the load with the file, line and field named.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

from gleaner.jsonl import json_lines
from gleaner.registry import register, registry

EVAL_SETS_ENV = "GLEANER_EVAL_SETS"
SHIPPED = Path(__file__).resolve().parent / "data"  # the sets gleaner may redistribute
# the known sets not shipped, and why (their upstream terms)
NOT_SHIPPED = {
    "vicuna": "its questions are CC-BY-NC-4.0 (lm-sys/FastChat issue #2073); get "
              "eval/table/question.jsonl of github.com/lm-sys/vicuna-blog-eval",
    "wizardlm": "its data is CC-BY-NC-4.0, research use only; get "
                "WizardLM/data/WizardLM_testset.jsonl of github.com/nlpxucan/WizardLM",
}


def eval_sets_folder(configured: str | None = None) -> str | None:
    """The folder named sets are read from: configured, else $GLEANER_EVAL_SETS (None: the
    shipped copies)."""
    return configured or os.environ.get(EVAL_SETS_ENV)


def shipped_file(file_name: str) -> str | None:
    path = SHIPPED / file_name
    return str(path) if path.is_file() else None


@dataclass(frozen=True)
class EvalPrompt:
    test_set: str
    id: str
    instruction: str
    input: str = ""

    @property
    def question(self) -> str:
        """The text the judge sees (Self-Instruct: instruction, blank line, instance input)."""
        return self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "question": self.question}


class EvalSetError(ValueError):
    pass


def _text(row: dict[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise EvalSetError(
            f"{where}: field {field!r} must be a non-empty string, got {value!r:.80}")
    return value


def _koala(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    return str(row.get("id", f"koala_{line}")), _text(row, "prompt", where), ""


def _vicuna(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    return str(row.get("question_id", line)), _text(row, "text", where), ""


def _wizardlm(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    return str(row.get("idx", line)), _text(row, "Instruction", where), ""


def _sinstruct(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise EvalSetError(f"{where}: field 'instances' must be a non-empty list of objects")
    instance_input = instances[0].get("input", "")
    if not isinstance(instance_input, str):
        raise EvalSetError(f"{where}: field 'instances[0].input' must be a string")
    return str(row.get("id", line)), _text(row, "instruction", where), instance_input.strip()


def _mt_bench(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise EvalSetError(f"{where}: field 'turns' must be a non-empty list of strings")
    return str(row.get("question_id", line)), turns[0], ""


def _generic(row: dict[str, Any], line: int, where: str) -> tuple[str, str, str]:
    key = row.get("id", row.get("question_id", line))
    return str(key), _text(row, "prompt", where), ""


Reader = Callable[[dict[str, Any], int, str], tuple[str, str, str]]

# The known test sets (a registry: a new set is a reader and one register line): file name in
# the eval-sets folder, and how a row becomes (id, instruction, input).
for _name, _entry in {
    "koala": ("koala_test_set.jsonl", _koala),
    "vicuna": ("vicuna_test_set.jsonl", _vicuna),
    "wizardlm": ("wizardlm_test_set.jsonl", _wizardlm),
    "sinstruct": ("sinstruct_test_set.jsonl", _sinstruct),
    "mt_bench": ("mt_bench_question.jsonl", _mt_bench),
}.items():
    register("eval_set", _name)(_entry)


def known_sets() -> dict[str, tuple[str, Reader]]:
    return dict(registry("eval_set").items())
ALIASES = {"self-instruct": "sinstruct", "self_instruct": "sinstruct", "mt-bench": "mt_bench",
           "mtbench": "mt_bench"}


def resolve(spec: str, test_sets_dir: str | None = None) -> tuple[str, str, Reader]:
    """(name, url, reader) for a known set name, ``name=path`` or a path to a prompt JSONL."""
    name, _, explicit = spec.partition("=")
    key = ALIASES.get(name.lower(), name.lower())
    known = known_sets()
    if explicit:
        reader = known[key][1] if key in known else _generic
        return name, explicit, reader
    if key in known:
        file_name, reader = known[key]
        directory = eval_sets_folder(test_sets_dir)
        if directory:
            return key, posixpath.join(directory.rstrip("/"), file_name), reader
        shipped = shipped_file(file_name)
        if shipped is None:
            why = NOT_SHIPPED.get(key, "gleaner does not ship it")
            raise EvalSetError(
                f"test set {spec!r} is not shipped with gleaner ({why}): set "
                f"evaluate.test_sets_dir or ${EVAL_SETS_ENV} to the folder holding "
                f"{file_name}")
        return key, shipped, reader
    stem = posixpath.basename(spec).rsplit(".", 1)[0] or spec
    return stem, spec, _generic


def load_eval_set(spec: str, test_sets_dir: str | None = None, limit: int | None = None,
                  storage_options: dict[str, Any] | None = None) -> list[EvalPrompt]:
    """Read one test set (all rows, or the first ``limit``)."""
    name, url, reader = resolve(spec, test_sets_dir)
    prompts: list[EvalPrompt] = []
    for number, where, row in json_lines(url, EvalSetError, f"test set {spec!r}",
                                         storage_options):
        key, instruction, instance_input = reader(row, number, where)
        prompts.append(EvalPrompt(name, key, instruction, instance_input))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def check_readable(specs: list[str], test_sets_dir: str | None = None) -> None:
    """Fail now, naming the config key, if a test set does not resolve to a readable file.

    The curate flow calls this before ingesting, so a wrong ``test_sets_dir``
    (e.g. a relative path read from another directory) stops the run at once
    instead of after rating and fine-tuning.
    """
    for spec in specs:
        try:
            _, url, _ = resolve(spec, test_sets_dir)
        except EvalSetError as error:
            raise EvalSetError(f"evaluate.test_sets: {error}") from None
        known = ALIASES.get(spec.lower(), spec.lower()) in known_sets()
        if "=" in spec or not known:
            where = f"evaluate.test_sets entry {spec!r}"
        elif test_sets_dir:
            where = f"evaluate.test_sets_dir = {test_sets_dir!r} (test set {spec!r})"
        else:
            where = f"${EVAL_SETS_ENV} = {os.environ.get(EVAL_SETS_ENV)!r} (test set {spec!r})"
        try:
            with fsspec.open(url, "rb") as handle:
                handle.read(1)
        except (OSError, ValueError) as error:
            local = "://" not in url
            relative = local and not os.path.isabs(url)
            hint = (f"; relative paths are resolved against the current directory "
                    f"({os.getcwd()})") if relative else ""
            reason = type(error).__name__ if not local else (
                getattr(error, "strerror", None) or type(error).__name__)
            raise EvalSetError(
                f"{where}: {url} is not a readable file ({reason}){hint}. Evaluation needs "
                f"it; fix the path or run with --no-eval") from None


def check_evaluation_inputs(config: Any) -> None:
    """Before ingesting: every test set the evaluation will read resolves to a readable file.

    Checked when the curate flow runs the evaluation itself (``curate.downstream:
    subflow``); with ``event`` the evaluate deployment reads them on its own worker.
    """
    if config.curate.evaluate and config.curate.downstream == "subflow":
        check_readable(config.evaluate.test_sets, config.evaluate.test_sets_dir)
