"""InsTag (Lu et al. 2023, SPEC §9): intention tags per instruction, and selection by them.

An LLM tags each example's query with open-set, fine-grained intention tags, answering a
JSON list ``[{"tag": str, "explanation": str}]``. Tags are normalised: lower case, the
words of a tag reduced to one form (punctuation dropped, a plural ``s`` dropped), so
near-identical tags ("Code Generation", "code-generation", "code generations") merge; the
selector then drops the tags fewer than ``select.min_label_frequency`` examples of the pool
use. Complexity is the number of an example's tags; diversity the number of distinct tags a
set covers. Selection, InsTag's complexity-first diverse sampling: walk the pool by tag
count, most first (ties by id); keep an example when it brings a tag the kept set does not
cover yet; stop at the budget.

Everything is registered here: the stage (``gleaner tag``, ``curate.signals: [tag]``, the
grid), its offline role, its cost plan, the ``tag_count`` and ``tags`` signals, and the
``instag`` selector.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gleaner.config import EndpointConfig, TagConfig
from gleaner.engine import Call, Conversation, LLMRowStage, ParseFailure, stage_schema
from gleaner.engine.catalog import PoolStage
from gleaner.engine.stage import declare
from gleaner.llm.offline import OfflineRole, capped_concurrency, offline_endpoint
from gleaner.registry import register
from gleaner.schema import user_assistant_pairs
from gleaner.tasks.select.selectors import (
    FAILED_UPSTREAM,
    KEPT,
    OVER_BUDGET,
    TOO_SIMILAR,
    Candidates,
    Manifest,
    Selector,
    SelectRequest,
    score_order,
)
from gleaner.tasks.select.signals import Signal

TAG = "tag"  # the stage, its folder and its config section
# The tagging prompt of the InsTag paper (Lu et al. 2023, "#InsTag: Instruction Tagging for
# Analyzing Supervised Fine-tuning of Large Language Models", the ChatGPT tagging prompt).
TAG_SYSTEM = "You are a helpful assistant."
TAG_TEMPLATE = (
    "Please identify tags of user intentions in the following user query and provide an "
    "explanation for each tag. Please respond in the JSON format {{\"tag\": str, "
    "\"explanation\": str}}.\n"
    "User query: {query}\n"
    "Please provide coarse-grained tags, such as \"Spelling and Grammar Check\" and "
    "\"Cosplay\", to identify main intentions of above user query. Your answer should be a "
    "list including titles of tags and a brief explanation of each tag. Your response have "
    "to strictly follow this JSON format: [{{\"tag\": str, \"explanation\": str}}]. Please "
    "response in English."
)
PROMPT_VERSION = hashlib.sha256(f"{TAG_SYSTEM}\x00{TAG_TEMPLATE}".encode()).hexdigest()[:12]

TAG_SCHEMA = stage_schema(
    pa.field("tags", pa.list_(pa.string())),  # normalised, distinct, in the tagger's order
    pa.field("tag_count", pa.int32()),  # InsTag's complexity
    pa.field("raw", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    llm=True,
)


# ---- tags --------------------------------------------------------------------------------
def normalise_tag(text: str) -> str:
    """Lower case, words only, each word without a plural ``s``: near-identical tags merge."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
                    for w in words)


def read_tags(completion: Any) -> list[str]:
    """The tags of a JSON list answer (the first ``[...]`` in it), normalised and distinct."""
    text = completion.text
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise ParseFailure("no JSON list of tags in the answer")
    try:
        items = json.loads(text[start:end + 1])
    except json.JSONDecodeError as error:
        raise ParseFailure(f"the list of tags is not valid JSON ({error.msg})") from None
    tags = [normalise_tag(item["tag"]) for item in items
            if isinstance(item, dict) and isinstance(item.get("tag"), str)]
    tags = list(dict.fromkeys(t for t in tags if t))
    if not tags:
        raise ParseFailure('no {"tag": str} item in the list')
    return tags


def query_of(row: dict[str, Any]) -> str:
    """What is tagged: the example's first user turn (instruction and its input)."""
    turns = user_assistant_pairs(row.get("conversation") or [])
    if turns:
        return turns[0][0]
    given = row.get("input") or ""
    return f"{row['instruction']}\n\n{given}" if given else row["instruction"]


# ---- the stage ---------------------------------------------------------------------------
class TagStage(LLMRowStage):
    """InsTag's tagger over every ingested example."""

    declared = declare(batch_size=256, concurrency=16)

    name = TAG
    input_columns = ("id", "instruction", "input", "conversation")
    summary_columns = ("tags", "tag_count")
    description = "InsTag intention tags"

    def __init__(self, section: TagConfig):
        super().__init__(section)
        self.settings = section

    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return TAG_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"model": self.endpoint.model, "prompt_version": PROMPT_VERSION,
                "max_tokens": self.settings.max_tokens,
                "parse_retries": self.settings.parse_retries}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        messages = [{"role": "system", "content": TAG_SYSTEM},
                    {"role": "user", "content": TAG_TEMPLATE.format(query=query_of(row))}]
        reading = yield Call(read_tags, messages, max_tokens=self.settings.max_tokens)
        return {"tags": reading.value, "tag_count": len(reading.value)}

    def row_defaults(self) -> dict[str, Any]:
        return {"model": self.endpoint.model}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        counts = Counter(t for tags in ok.column("tags").to_pylist() for t in tags or [])
        mean = pc.mean(ok["tag_count"]).as_py() if ok.num_rows else None
        return {"model": self.endpoint.model, "tagged": ok.num_rows,
                "distinct_tags": len(counts), "top_tags": dict(counts.most_common(20)),
                "mean_tag_count": None if mean is None else round(mean, 3)}


def describe(summary: dict[str, Any]) -> str:
    return (f"{summary.get('tagged', 0):,} examples tagged ({summary.get('failed', 0):,} "
            f"failed), {summary.get('distinct_tags', 0):,} distinct tags, mean "
            f"{summary.get('mean_tag_count')} a query ({summary.get('model')})")


# ---- selection ---------------------------------------------------------------------------
def frequent_tags(tags: Sequence[list[str] | None], min_frequency: int) -> list[set[str]]:
    """Each example's tags without those fewer than ``min_frequency`` examples use."""
    used = Counter(t for row in tags for t in set(row or []))
    return [{t for t in row or [] if used[t] >= min_frequency} for row in tags]


def select_instag(ids: Sequence[str], tags: Sequence[list[str] | None], budget: int,
                  min_frequency: int = 1) -> Manifest:
    """Complexity-first diverse sampling: by tag count, most first (ties by id), keep an
    example that adds a tag not yet covered, until ``budget`` are kept."""
    ids = list(ids)
    kept_tags = frequent_tags(tags, min_frequency)
    counts = np.array([len(t) if row is not None else np.nan
                       for t, row in zip(kept_tags, tags, strict=True)], dtype=np.float64)
    order = score_order(ids, counts, np.flatnonzero(np.isfinite(counts)))
    selected = np.zeros(len(ids), dtype=bool)
    rank = np.full(len(ids), -1, dtype=np.int64)
    reason = [FAILED_UPSTREAM] * len(ids)
    covered: set[str] = set()
    kept = 0
    for position, row in enumerate(order):
        rank[row] = position
        if kept >= budget:
            reason[row] = OVER_BUDGET
        elif kept_tags[row] - covered:
            covered |= kept_tags[row]
            selected[row], reason[row] = True, KEPT
            kept += 1
        else:
            reason[row] = TOO_SIMILAR  # every tag of it is covered already
    return Manifest(ids, counts, selected, reason, rank, ["instag"] * len(ids))


def _instag(data: Candidates, request: SelectRequest) -> Manifest:
    if "tags" not in data.labels:
        raise ValueError("the instag selector needs InsTag's tags; run gleaner tag first")
    return select_instag(data.ids, data.labels["tags"], request.budget,
                         request.min_label_frequency)


# ---- registrations -------------------------------------------------------------------------
register("pool_stage", TAG)(PoolStage(
    lambda config: TagStage(config.tag), TAG, "tag",
    "Tag every example's query with intention tags (InsTag): complexity and diversity.",
    roles=("tagger",), describe=describe))
register("offline_role", "tagger")(OfflineRole(
    "tag.endpoint", lambda c: {"tag.max_tokens": min(c.tag.max_tokens, c.tag.offline_max_tokens),
                               **capped_concurrency(c, "tag.resources")},
    "no tag endpoint configured: the offline SmolLM2 server tags (a 135M model: expect many "
    "answers that are no JSON list); set tag.endpoint.base_url for a real tagger"))
register("planned_stage", TAG)(lambda config: TagStage(
    config.tag if config.tag.endpoint.base_url else config.tag.model_copy(
        update={"endpoint": offline_endpoint(config.tag.endpoint)})))
register("signal", "tag_count")(Signal("tag_count", TAG, "tag_count", "InsTag tags a query",
                                       tuple(float(x) - 0.5 for x in range(0, 17))))
register("signal", "tags")(Signal("tags", TAG, "tags", "InsTag tags", (), labels=True))
register("selector", "instag")(Selector(_instag, "tag_count"))
