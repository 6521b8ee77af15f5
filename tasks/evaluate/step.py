"""A pairwise evaluation on the step contract (gleaner.engine.step).

Its key: the test sets and their limit, the combination rule, the judge and what shapes
the answers and the verdicts; its inputs: both models' versions (``run.model_identity``: a
trained model of the run by its metrics, a folder by its files, a hub id by name), so a
retrained model is answered and judged again. Done when the
comparison's summary is in the store: a rerun then loads no model, asks nothing and
rewrites no answer, pair or report.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import Step
from gleaner.store import Store


def verdict_settings(config: GleanerConfig) -> dict[str, Any]:
    """What shapes the answers and the verdicts besides the test sets (the grid's arms key
    on the same)."""
    e = config.evaluate
    g = e.generation
    return {"judge": e.endpoint.model, "max_tokens": e.max_tokens,
            "max_new_tokens": g.max_tokens, "do_sample": g.do_sample,
            "temperature": g.temperature if g.do_sample else None,
            "generation": {"backend": g.backend, "dtype": g.dtype},
            "likert": e.likert.model_dump(mode="json", include={
                "samples", "resamples", "seed", "max_tokens"}) if e.likert.enabled else None}


class EvaluateStep(Step):
    """Model A against model B on the test sets (answers, both orders judged, the report)."""

    kind = "evaluate"
    force_hint = "evaluate.force: true (gleaner evaluate --force)"

    def __init__(self, store: Store, run_id: str, config: GleanerConfig, comparison: str,
                 references: tuple[str, str], test_sets: list[str], limit: int | None,
                 rule: str, evaluate: Callable[[], dict[str, Any]]):
        self.config, self.comparison, self.evaluate = config, comparison, evaluate
        from gleaner.tasks.evaluate.run import model_identity

        self.models = {side: model_identity(store, run_id, config, reference)
                       for side, reference in zip(("a", "b"), references, strict=True)}
        self.test_sets, self.limit, self.rule = list(test_sets), limit, rule

    @property
    def name(self) -> str:
        return f"evaluate/{self.comparison}"

    def settings(self) -> dict[str, Any]:
        return {"test_sets": self.test_sets, "limit": self.limit, "rule": self.rule,
                **verdict_settings(self.config)}

    def inputs(self) -> dict[str, Any]:
        return {"models": self.models}  # a retrained model is judged again

    def done(self, store: Store, run_id: str) -> bool:
        return store.exists(posixpath.join(layout.comparison_dir(store, run_id, self.comparison),
                                           "summary.json"))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        return self.evaluate()
