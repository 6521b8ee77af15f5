"""Test-set decontamination: pool examples whose prompt overlaps a test prompt are marked.

The rule (docs/methods.md), on normalised text (lower case, words only: punctuation
dropped, whitespace collapsed):

- ``ngram``: the example's prompt shares a run of ``decontaminate.ngram`` words (13, the
  n-gram GPT-3 (Brown et al. 2020, Appendix C) and Llama 2 (Touvron et al. 2023, Appendix A.6)
  used) with a test prompt;
- ``exact``: the example's prompt equals a test prompt (this is what catches test prompts
  shorter than the n-gram).

An example's prompt is each of its user turns (for Alpaca records, the instruction and its
input together: the conversation's final user turn). A test prompt is the set's question
(Self-Instruct: instruction and instance input; MT-Bench: the first turn, as the evaluation
asks it). The index of the test prompts (every n-gram and every normalised prompt) is built
on the driver and travels with the stage to the workers, each marking its own batch. The
settings and a fingerprint of every test set's prompts are the stage's plan: a changed test
set refuses a rerun unless ``--force``.

Registered here: the stage (``gleaner decontaminate``, ``curate.filters``), and the mark
selection honours (reason ``contaminated:<test set>``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner.config import DecontaminateConfig, GleanerConfig
from gleaner.engine import Stage, rows_table, stage_schema
from gleaner.engine.catalog import Drop, PoolStage, StageFlag
from gleaner.engine.stage import declare
from gleaner.registry import register
from gleaner.tasks.evaluate.eval_sets import ALIASES, EvalPrompt, EvalSetError, load_eval_set
from gleaner.tasks.select.selectors import CONTAMINATED

DECONTAMINATE = "decontaminate"  # the stage, its folder, its config section and verb
NORMALISATION = "lower-words-v1"  # how texts are compared (part of the plan)
MATCHED_CHARS = 200  # the matched text is kept this long
_WORD = re.compile(r"\w+")

DECONTAMINATE_SCHEMA = stage_schema(
    pa.field("contaminated", pa.bool_(), nullable=False),
    pa.field("rule", pa.string()),  # ngram | exact (exact wins when both hold)
    pa.field("test_set", pa.string()),  # the first test set a prompt of which it matched
    pa.field("test_id", pa.string()),  # that prompt's id in its set
    pa.field("matched", pa.string()),  # the shared n-gram, or the normalised prompt (cut)
)


def words(text: str) -> list[str]:
    """Lower case, words only (punctuation dropped, whitespace collapsed)."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def prompts_of(row: Mapping[str, Any]) -> list[str]:
    """An example's prompts: every user turn (else its instruction and input)."""
    turns = [t["content"] for t in row.get("conversation") or [] if t["role"] == "user"]
    if turns:
        return turns
    given = row.get("input") or ""
    return [f"{row.get('instruction') or ''}\n\n{given}" if given else row.get("instruction") or ""]


@dataclass
class PromptIndex:
    """Every n-gram and normalised prompt of the test sets, pointing at the first prompt."""

    n: int
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (test set, id)
    grams: dict[str, int] = field(default_factory=dict)
    exact: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # prompts per test set
    fingerprints: dict[str, str] = field(default_factory=dict)  # per test set, of its prompts

    @classmethod
    def build(cls, sets: Mapping[str, list[EvalPrompt]], n: int) -> PromptIndex:
        index = cls(n)
        for name, prompts in sets.items():
            digest = hashlib.sha256()
            for prompt in prompts:
                digest.update("\x1f".join((prompt.id, prompt.instruction, prompt.input))
                              .encode() + b"\x1e")
                where = len(index.prompts)
                index.prompts.append((name, prompt.id))
                tokens = words(prompt.question)
                index.exact.setdefault(" ".join(tokens), where)
                for gram in ngrams(tokens, n):
                    index.grams.setdefault(gram, where)
            index.sizes[name] = len(prompts)
            index.fingerprints[name] = digest.hexdigest()[:16]
        index.exact.pop("", None)
        return index

    def match(self, texts: list[str]) -> dict[str, Any] | None:
        """The first hit of an example's prompts: exact before n-gram; None when clean."""
        found: dict[str, Any] | None = None
        for text in texts:
            tokens = words(text)
            joined = " ".join(tokens)
            hit = self.exact.get(joined)
            if hit is not None:
                return self._row(hit, "exact", joined)
            if found is None:
                for gram in ngrams(tokens, self.n):
                    hit = self.grams.get(gram)
                    if hit is not None:
                        found = self._row(hit, "ngram", gram)
                        break
        return found

    def _row(self, where: int, rule: str, matched: str) -> dict[str, Any]:
        test_set, test_id = self.prompts[where]
        return {"contaminated": True, "rule": rule, "test_set": test_set, "test_id": test_id,
                "matched": matched[:MATCHED_CHARS]}


def test_set_specs(config: GleanerConfig) -> list[str]:
    """The configured sets; None: the evaluation's sets and MT-Bench (each once)."""
    specs = config.decontaminate.test_sets
    if specs is None:
        specs = [*config.evaluate.test_sets, "mt_bench"]
    unique: dict[str, str] = {}
    for spec in specs:
        unique.setdefault(ALIASES.get(spec.lower(), spec.lower()) if "=" not in spec else spec,
                          spec)
    return list(unique.values())


def load_test_sets(specs: list[str], test_sets_dir: str | None) -> dict[str, list[EvalPrompt]]:
    """Every test set's prompts, by name; an empty set or no set at all is an error."""
    if not specs:
        raise EvalSetError("decontaminate.test_sets is empty: name at least one test set")
    out: dict[str, list[EvalPrompt]] = {}
    for spec in specs:
        prompts = load_eval_set(spec, test_sets_dir)
        if not prompts:
            raise EvalSetError(f"test set {spec!r} has no prompts: decontaminating against it "
                               "would find nothing; fix the file or leave the set out")
        out[prompts[0].test_set] = prompts
    return out


class DecontaminateWorker:
    def __init__(self, index: PromptIndex):
        self.index = index

    def process(self, rows: pa.Table) -> pa.Table:
        out = []
        for row in rows.to_pylist():
            hit = self.index.match(prompts_of(row))
            out.append({"id": row["id"], "status": "ok", "contaminated": False, **(hit or {})})
        return rows_table(out, DECONTAMINATE_SCHEMA)

    def close(self) -> None:
        return None


class DecontaminateStage(Stage):
    """Marks every ingested example whose prompt overlaps a test prompt."""

    declared = declare(batch_size=8192)

    name = DECONTAMINATE
    input_columns = ("id", "instruction", "input", "conversation")
    summary_columns = ("contaminated", "rule", "test_set", "test_id", "matched")
    description = "test-set decontamination (n-gram and exact overlap)"

    def __init__(self, section: DecontaminateConfig, specs: list[str],
                 test_sets_dir: str | None):
        super().__init__(section)
        self.settings, self.specs, self.test_sets_dir = section, specs, test_sets_dir
        self._index: PromptIndex | None = None

    @property
    def index(self) -> PromptIndex:
        """Built once, on the driver (the first ``requested()``); pickled with the stage."""
        if self._index is None:
            sets = load_test_sets(self.specs, self.test_sets_dir)
            self._index = PromptIndex.build(sets, self.settings.ngram)
        return self._index

    @property
    def schema(self) -> pa.Schema:
        return DECONTAMINATE_SCHEMA

    def check_input(self, rows: int) -> None:
        if rows == 0:
            raise ValueError("the pool is empty: there is nothing to decontaminate (0 examples "
                             "ingested); ingest examples first")

    def requested(self) -> dict[str, Any]:
        index = self.index
        return {"ngram": self.settings.ngram, "normalisation": NORMALISATION,
                "prompts": "user-turns", "test_sets": dict(index.fingerprints)}

    def row_defaults(self) -> dict[str, Any]:
        return {"contaminated": False}

    def open(self) -> DecontaminateWorker:
        return DecontaminateWorker(self.index)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        marked = ok.filter(ok["contaminated"])
        by_set = Counter(marked.column("test_set").to_pylist())
        by_rule = Counter(marked.column("rule").to_pylist())
        examples = marked.slice(0, 5).select(["id", "rule", "test_set", "test_id", "matched"])
        index = self.index
        return {"contaminated": marked.num_rows, "clean": ok.num_rows - marked.num_rows,
                "all_contaminated": ok.num_rows > 0 and marked.num_rows == ok.num_rows,
                "by_test_set": dict(by_set), "by_rule": dict(by_rule),
                "test_prompts": dict(index.sizes), "ngram": self.settings.ngram,
                "test_prompts_matched": len(set(zip(marked.column("test_set").to_pylist(),
                                                    marked.column("test_id").to_pylist(),
                                                    strict=True))),
                "examples_found": examples.to_pylist()}


def describe(summary: Mapping[str, Any]) -> str:
    total = summary.get("examples", 0)
    found = summary.get("contaminated", 0)
    share = f"{100.0 * found / total:.2f} %" if total else "n/a"
    sets = ", ".join(f"{k} {v:,}" for k, v in (summary.get("by_test_set") or {}).items())
    text = (f"{found:,} of {total:,} examples contaminated ({share}; {sets or 'none'}), "
            f"{summary.get('clean', 0):,} clean; {summary.get('ngram')}-grams and exact "
            f"matches against {sum((summary.get('test_prompts') or {}).values()):,} test "
            f"prompts of {', '.join(summary.get('test_prompts') or {})}")
    if summary.get("all_contaminated"):
        text += ". Every example is contaminated: nothing is left to select"
    return text


def make(config: GleanerConfig) -> DecontaminateStage:
    section = config.decontaminate
    return DecontaminateStage(section, test_set_specs(config),
                              section.test_sets_dir or config.evaluate.test_sets_dir)


register("pool_stage", DECONTAMINATE)(PoolStage(
    make, DECONTAMINATE, DECONTAMINATE,
    "Mark every example whose prompt shares a 13-gram with (or equals) a test prompt.",
    panel="Choose", describe=describe,
    drop=Drop(DECONTAMINATE, "contaminated", CONTAMINATED, detail="test_set"),
    flags=(StageFlag("--test-sets", "decontaminate.test_sets", str,
                     "Test sets: names (vicuna,koala,wizardlm,sinstruct,mt_bench) or JSONL "
                     "files; comma-separated or repeated.", many=True),
           StageFlag("--ngram", "decontaminate.ngram", int,
                     "Words in a shared n-gram that marks an example (default 13)."))))
