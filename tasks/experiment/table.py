"""The grid's result: one table (arms x test sets), the length-bias table, MT-Bench, one plot.

Per arm and test set: W/T/L against the baseline (AlpaGasus' rule unless
``evaluate.rule`` says otherwise), the winning score (W - L) / N + 1 and the
judge failures, which add up to the test set's prompts. Per arm: its size,
mean response length, the tokens and wall time of its fine-tune, what the
signals it selects by cost (rating, or DEITA's scorers behind an endpoint) and
what judging it cost. The plot is the winning score per arm per test set (the
shape of AlpaGasus' Fig. 5), a dashed line at 1.0: as good as the baseline.
"""

from __future__ import annotations

import base64
import io
import posixpath
from collections.abc import Mapping
from typing import Any

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.config import GleanerConfig
from gleaner.engine.step import publish_markdown
from gleaner.store import Store


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _usd(value: float | None) -> str:
    return "—" if value is None else f"${value:,.4f}"


def check_adds_up(arm: Mapping[str, Any], prompts: Mapping[str, int]) -> None:
    """W + T + L + failed = the test set's prompts, for every judged arm (or a bug)."""
    for test_set, part in ((arm.get("evaluation") or {}).get("test_sets") or {}).items():
        total = part["win"] + part["tie"] + part["lose"] + part["failed"]
        if total != prompts[test_set]:
            raise RuntimeError(f"arm {arm['arm']} on {test_set}: W/T/L/failed add up to {total}, "
                               f"not the {prompts[test_set]} prompts (a bug: please report it)")


def grid_result(run_id: str, config: GleanerConfig, pool_run: str,
                arms: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid as data (table.json): every arm in order, what failed, and the test sets."""
    from gleaner.tasks.experiment.steps import test_prompts

    prompts = {name: len(p) for name, p in test_prompts(config).items()}
    for arm in arms:
        if arm.get("status") == "ok":
            check_adds_up(arm, prompts)
    exp = config.experiment
    judges = [(a.get("evaluation") or a.get("mt_bench") or {}).get("judge_model") for a in arms]
    judge = next((j for j in judges if j), config.evaluate.endpoint.model)  # the one that judged
    return {"experiment": exp.name, "run_id": run_id, "pool_run": pool_run,
            "baseline": exp.baseline or exp.arms[0].name, "judge": judge,
            "rule": config.evaluate.rule, "test_sets": prompts, "mt_bench": exp.mt_bench,
            "arms": arms, "failed_arms": [a["arm"] for a in arms if a.get("status") != "ok"]}


def _lc(rate: float | None) -> str:
    return "—" if rate is None else f"{100 * rate:.1f} %"


def grid_markdown(result: Mapping[str, Any]) -> str:
    sets = list(result["test_sets"])
    head = ["arm", "selector", "examples", "mean resp. chars", "train tokens", "train s",
            "signals $", "judge $"]
    for name in sets:
        head += [f"{name} W/T/L", f"{name} score", f"{name} LC win rate", f"{name} failed"]
    mt = result.get("mt_bench")
    if mt:
        head.append("MT-Bench")
    lines = [f"# Experiment `{result['experiment']}` (run `{result['run_id']}`)", "",
             f"Baseline: **{result['baseline']}**; judge {result['judge']}, {result['rule']} "
             "rule, both orders.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for arm in result["arms"]:
        if arm.get("status") != "ok":
            lines.append(f"| {arm['arm']} | **{arm.get('status')}**: {arm.get('error', '')} |")
            continue
        ft, cost = arm.get("finetune") or {}, arm.get("cost") or {}
        selector = arm["selector"]["selector"] + (" + DPO" if arm.get("dpo") else "")
        row = [arm["arm"], selector, _num(arm["examples"]),
               _num(arm.get("mean_response_chars"), 1), _num(ft.get("train_tokens")),
               _num(ft.get("wall_seconds"), 1), _usd(cost.get("signals_usd")),
               _usd(cost.get("judge_usd"))]
        tallies = (arm.get("evaluation") or {}).get("test_sets") or {}
        for name in sets:
            part = tallies.get(name)
            row += (["baseline", "—", "—", "—"] if arm.get("baseline") else ["—"] * 4) \
                if not part else [f"{part['win']}/{part['tie']}/{part['lose']}",
                                  _num(part["winning_score"]), _lc(part.get("lc_win_rate")),
                                  str(part["failed"])]
        if mt:
            row.append(_num((arm.get("mt_bench") or {}).get("overall"), 2))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Length and position bias", "",
              "| arm | test set | answer chars (arm) | answer chars (baseline) | orders disagree "
              "| longer answer won |", "|---|---|---:|---:|---:|---:|"]
    for arm in result["arms"]:
        for name, b in (arm.get("bias") or {}).items():
            lines.append(
                f"| {arm['arm']} | {name} | {_num(b['mean_answer_chars_arm'], 1)} | "
                f"{_num(b['mean_answer_chars_baseline'], 1)} | {b['orders_disagree']}/"
                f"{b['pairs_both_orders']} ({_num(b['order_disagreement'], 2)}) | "
                f"{_num(b['longer_answer_won'], 2)} of {b['decided_with_length_gap']} |")
    if mt:
        categories = sorted({c for arm in result["arms"]
                             for c in ((arm.get("mt_bench") or {}).get("categories") or {})})
        lines += ["", "## MT-Bench (FastChat single grading, 1-10)", "",
                  "| arm | overall | turn 1 | turn 2 | failed | " + " | ".join(categories) + " |",
                  "|---|" + "---:|" * (4 + len(categories))]
        for arm in result["arms"]:
            m = arm.get("mt_bench")
            if not m:
                continue
            cats = [_num(m["categories"].get(c, {}).get("mean"), 2) for c in categories]
            lines.append(f"| {arm['arm']} | {_num(m['overall'], 2)} | {_num(m['turns']['1'], 2)}"
                         f" | {_num(m['turns']['2'], 2)} | {m['failed']} | " + " | ".join(cats)
                         + " |")
    return "\n".join(lines) + "\n"


def winning_score_png(result: Mapping[str, Any]) -> bytes:
    """Grouped bars: the winning score of each judged arm on each test set, 1.0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in result["arms"] if (a.get("evaluation") or {}).get("test_sets")]
    sets = list(result["test_sets"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(arms) * max(1, len(sets)) ** 0.5), 3.2))
    width = 0.8 / max(1, len(sets))
    for j, name in enumerate(sets):
        values = [(a["evaluation"]["test_sets"].get(name) or {}).get("winning_score") or 0.0
                  for a in arms]
        ax.bar([i + (j - (len(sets) - 1) / 2) * width for i in range(len(arms))], values,
               width, label=name)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(arms)), [a["arm"] for a in arms], rotation=20, ha="right")
    ax.set_ylim(0.0, 2.0)
    ax.set_ylabel(f"winning score vs {result['baseline']}")
    ax.set_title(f"experiment {result['experiment']}: (W - L) / N + 1")
    if sets:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_result(store: Store, run_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """table.md, table.json and winning_score.png in the experiment's folder."""
    name = result["experiment"]
    markdown = grid_markdown(result)
    table = store.write_bytes(layout.experiment_file(store, run_id, name, "table.md"),
                              markdown.encode())
    plot = store.write_bytes(layout.experiment_file(store, run_id, name, "winning_score.png"),
                             winning_score_png(result))
    result = {**result, "markdown": markdown, "table": store.uri(table), "plot": store.uri(plot)}
    store.write_json(layout.experiment_file(store, run_id, name, "table.json"), result)
    return result


def publish(store: Store, run_id: str, result: Mapping[str, Any]) -> None:
    """The table (the plot inline) and a per-arm table artifact, in the Prefect UI."""
    png = store.read_bytes(posixpath.join(layout.experiment_dir(
        store, run_id, result["experiment"]), "winning_score.png"))
    image = f"\n![winning score](data:image/png;base64,{base64.b64encode(png).decode()})\n"
    key = artifact_key("experiment", result["experiment"], run_id)
    rows = []
    for arm in result["arms"]:
        for name, part in ((arm.get("evaluation") or {}).get("test_sets") or {}).items():
            rows.append({"arm": arm["arm"], "test_set": name, **{
                k: part.get(k) for k in ("win", "tie", "lose", "failed", "winning_score",
                                         "lc_win_rate")}})
    publish_markdown(key, result["markdown"] + image,
                     f"experiment {result['experiment']}: the grid",
                     table=rows or [{"arm": "none judged"}])
