"""Fine-tuning as a flow: the curated model and its baseline, trained with the same recipe.

The deployable entry point (``flows/finetune_flow.py:finetune_flow``), triggered
by a completed selection in prefect.yaml; each model is one Prefect task run
(Ray Train inside), and the training report is published as an artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from gleaner.artifacts import artifact_key, run_name
from gleaner.config import GleanerConfig
from gleaner.engine.step import publish_markdown
from gleaner.runs import new_run_id
from gleaner.tasks.train.run import finetune_task, report_markdown


@flow(name="finetune", flow_run_name=run_name("finetune"), validate_parameters=False)
def finetune_flow(run_id: str | None = None, config: GleanerConfig | None = None,
                  dataset: str | None = None, baseline: str | None = None) -> dict[str, Any]:
    """Train ``curated`` (and the configured baseline) for a run.

    Returns ``{"curated": summary, "baseline": summary}`` (no baseline with ``none``).
    """
    config = config or GleanerConfig()
    run_id = run_id or config.run_id or new_run_id()
    baseline = baseline or config.finetune.baseline
    summaries = {"curated": finetune_task(run_id, config, "curated", dataset)}
    if baseline != "none":
        summaries["baseline"] = finetune_task(run_id, config, "baseline", dataset, baseline)
    if not all(s.get("reused") for s in summaries.values()):
        publish_markdown(artifact_key("finetune", run_id), report_markdown(
            list(summaries.values())), f"fine-tuning of run {run_id}")
    return summaries
