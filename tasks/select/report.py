"""The selection report a person looks at: where every example went, and the score histograms.

- counts per reason (kept, below_threshold, too_similar, over_budget, failed_upstream);
- histograms of the AlpaGasus rating and DEITA's c, q and s, for the pool and
  for the selected set, like AlpaGasus' Fig. 4 (PNG, matplotlib's Agg back end);
- the similarity threshold's effect: how many examples were rejected as too
  similar, and how many of the top-m by score that displaced;
- a markdown summary (for a Prefect artifact) and a JSON document.

Written under ``runs/<run_id>/report/`` in the store.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gleaner import layout
from gleaner.store import Store
from gleaner.tasks.select.selectors import Manifest


def bins_and_titles() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Histogram bins and titles per selection signal, from the signal registry."""
    from gleaner.tasks.select.signals import signals

    registered = signals()
    return {s.name: s.bins() for s in registered}, {s.name: s.title for s in registered}


@dataclass
class Report:
    counts: dict[str, int]
    histograms: dict[str, dict[str, Any]]
    similarity: dict[str, Any]
    settings: dict[str, Any]
    markdown: str = ""
    figure: bytes | None = field(default=None, repr=False)

    def document(self) -> dict[str, Any]:
        return {"counts": self.counts, "histograms": self.histograms,
                "similarity": self.similarity, "settings": self.settings}


def histogram(values: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
    """Counts of the finite values per bin; values outside the range land in the edge bins."""
    finite = values[np.isfinite(values)]
    clipped = np.clip(finite, bins[0], bins[-1])
    counts, edges = np.histogram(clipped, bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist(),
            "n": int(finite.size)}


def similarity_effect(manifest: Manifest) -> dict[str, Any]:
    """How the diversity threshold changed the selection (deita only; zeros otherwise)."""
    counts = manifest.counts()
    rejected = counts["too_similar"]
    selected = int(np.sum(manifest.selected))
    ranked = manifest.rank >= 0
    # Without the threshold the walk would have kept the top-`selected` ranks.
    top = ranked & (manifest.rank < selected)
    displaced = int(np.sum(top & ~manifest.selected))
    neighbours = {r.split(":", 1)[1] for r in manifest.reason if r.startswith("too_similar:")}
    deepest = int(manifest.rank[manifest.selected].max()) + 1 if selected else 0
    return {"too_similar": rejected, "displaced_from_top": displaced,
            "selected_with_similar_rejected": len(neighbours), "walked_rows": deepest}


def build_report(
    manifest: Manifest, columns: Mapping[str, np.ndarray], select_settings: Any = None,
    tau: float | None = None,
) -> Report:
    counts = manifest.counts()
    settings = select_settings.model_dump() if hasattr(select_settings, "model_dump") else dict(
        select_settings or {})
    if settings.get("sort_by") is None and settings.get("selector"):
        from gleaner.tasks.select.selectors import selector

        settings["sort_by"] = selector(settings["selector"]).default_sort
    selected = np.asarray(manifest.selected, dtype=bool)
    histograms: dict[str, dict[str, Any]] = {}
    for name, bins in bins_and_titles()[0].items():
        values = columns.get(name)
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        histograms[name] = {"pool": histogram(values, bins),
                            "selected": histogram(values[selected], bins)}
    similarity = similarity_effect(manifest)
    report = Report(counts, histograms, similarity, settings)
    report.markdown = markdown(report, len(manifest), tau)
    report.figure = figure_png(columns, selected) if histograms else None
    return report


def markdown(report: Report, total: int, tau: float | None) -> str:
    lines = ["# Selection report", ""]
    s = report.settings
    if s:
        lines.append(
            f"Selector **{s.get('selector')}** by `{s.get('sort_by')}`, size {s.get('size')}, "
            f"tau {s.get('tau')}, threshold {s.get('threshold')}, seed {s.get('seed')}"
        )
        lines.append("")
    lines += ["| reason | examples |", "|---|---:|"]
    lines += [f"| {reason} | {count:,} |" for reason, count in report.counts.items()]
    lines += [f"| **total** | **{total:,}** |", ""]
    sim = report.similarity
    if sim["too_similar"]:
        lines.append(
            f"Similarity threshold{f' {tau}' if tau is not None else ''}: "
            f"{sim['too_similar']:,} rejected as too similar to "
            f"{sim['selected_with_similar_rejected']:,} selected examples; "
            f"{sim['displaced_from_top']:,} of the top {report.counts['kept']:,} by score were "
            f"displaced; the walk went {sim['walked_rows']:,} rows deep."
        )
        lines.append("")
    if report.histograms:
        titles = bins_and_titles()[1]
        lines += ["| score | pool n | pool mean | selected mean |", "|---|---:|---:|---:|"]
        for name, h in report.histograms.items():
            lines.append(f"| {titles.get(name, name)} | {h['pool']['n']:,} | {_mean(h['pool'])} | "
                         f"{_mean(h['selected'])} |")
    return "\n".join(lines)


def _mean(h: dict[str, Any]) -> str:
    if not h["n"]:
        return "—"
    edges = np.asarray(h["edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    return f"{float(np.dot(mids, h['counts']) / h['n']):.2f}"


def figure_png(columns: Mapping[str, np.ndarray], selected: np.ndarray) -> bytes:
    """One panel per available score: pool vs selected histograms (AlpaGasus Fig. 4 style)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    all_bins, titles = bins_and_titles()
    names = [n for n in all_bins if n in columns]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = np.asarray(columns[name], dtype=np.float64)
        bins = all_bins[name]
        pool = np.clip(values[np.isfinite(values)], bins[0], bins[-1])
        chosen = values[selected]
        chosen = np.clip(chosen[np.isfinite(chosen)], bins[0], bins[-1])
        ax.hist(pool, bins=bins, color="#9bb7d4", edgecolor="white", label=f"pool ({pool.size:,})")
        ax.hist(chosen, bins=bins, color="#d1495b", alpha=0.85, edgecolor="white",
                label=f"selected ({chosen.size:,})")
        ax.set_title(titles[name])
        ax.set_xlabel("score")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(store: Store, run_id: str, report: Report) -> dict[str, str]:
    """report.json, report.md and scores.png under runs/<run_id>/report/."""
    folder = layout.report_dir(store, run_id)
    paths = {
        "json": store.write_json(posixpath.join(folder, "select-report.json"),
                                 report.document()),
        "markdown": store.write_bytes(posixpath.join(folder, "select-report.md"),
                                      report.markdown.encode("utf-8")),
    }
    if report.figure:
        paths["figure"] = store.write_bytes(posixpath.join(folder, "scores.png"), report.figure)
    return paths
