"""Arms of an experiment: the short form, names, and which arms share a selection and a model.

An arm is a selector with its settings (docs/experiments.md). The short form is
``<selector>[@<setting>]``:

    full                 every example of the pool
    random@9k            9,000 at random (``k`` = thousand; ``9000`` works too)
    alpagasus@τ4.5       AlpaGasus: rating >= 4.5 (``t4.5``, ``tau4.5``; alone: rate.threshold)
    deita@6k             DEITA's score-first, diversity-aware 6,000 (``deita@τ0.8`` sets its tau)
    ifd@5%               IFD: drop IFD > 1, keep the top 5 % of the pool
    longest@1k           Long-is-more: the 1,000 longest responses (tokens)
    alpagasus@τ4.5+dpo   the same fine-tune, then DPO on the pool run's comparison pairs

Its name is the short form made path-safe (``alpagasus-t4_5``, ``ifd-5pct``,
``alpagasus-t4_5-dpo``). A DPO arm is its own selection (its model differs) whose
fine-tune is the one its twin without ``+dpo`` trains (the same name: trained once).
Arms whose selections are the same (same selector and settings over the same
pool) share one selection, one dataset version and one fine-tuned model: the
identity is a hash of those settings, and the model's also of the recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gleaner.config import ArmConfig, GleanerConfig, SelectConfig
from gleaner.engine.plan import settings_key

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
# names people use for a selector with its usual settings
ALIASES: dict[str, dict[str, Any]] = {
    "alpagasus": {"selector": "threshold", "sort_by": "rating"},
    "superfiltering": {"selector": "ifd"},  # the same selector; the small model is the config's
}
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kK]?)$")
_FRACTION = re.compile(r"^(\d+(?:\.\d+)?)%$")
_TAU = re.compile(r"^(?:τ|t|tau)(\d+(?:\.\d+)?)$")
DPO_SUFFIX = "+dpo"


def arm_name(spec: str) -> str:
    """``alpagasus@τ4.5`` -> ``alpagasus-t4_5``: a name that is also a model and path name."""
    name = spec.strip().lower().replace("@", "-").replace("τ", "t").replace("%", "pct")
    name = name.replace(DPO_SUFFIX, "-dpo")
    return re.sub(r"[^a-z0-9_-]+", "_", name)


def parse_arm(value: str | dict[str, Any]) -> dict[str, Any]:
    """The fields of an :class:`ArmConfig` from the short form or a mapping (aliases expanded)."""
    if isinstance(value, dict):
        fields = dict(value)
        alias = ALIASES.get(str(fields.get("selector", "")))
        return {**alias, **{k: v for k, v in fields.items() if k != "selector"}} if alias \
            else fields
    spec = value.strip()
    dpo = spec.lower().endswith(DPO_SUFFIX)
    selector, _, setting = spec.removesuffix(spec[-len(DPO_SUFFIX):] if dpo else "").partition("@")
    fields = {"name": arm_name(value), **ALIASES.get(selector, {"selector": selector})}
    if dpo:
        fields["dpo"] = True
    if not setting:
        return fields
    if match := _COUNT.match(setting):
        number = float(match.group(1)) * (1000 if match.group(2) else 1)
        if number != int(number) or number < 1:
            raise ValueError(f"arm {value!r}: {setting!r} is not a whole number of examples")
        fields["budget"] = int(number)
    elif match := _FRACTION.match(setting):
        fields["fraction"] = float(match.group(1)) / 100
    elif match := _TAU.match(setting):
        key = "tau" if fields["selector"] == "deita" else "threshold"
        fields[key] = float(match.group(1))
    else:
        raise ValueError(f"arm {value!r}: after '@' comes a size (9k, 1000), a share of the pool "
                         f"(5%) or a threshold (τ4.5), not {setting!r}")
    return fields


def check_arms(arms: list[ArmConfig], baseline: str | None) -> None:
    """Names unique and path-safe, the baseline and ``size_of`` name arms, sizes given."""
    from gleaner.tasks.select.selectors import selector

    names = [a.name for a in arms]
    for arm in arms:
        if not NAME_RE.match(arm.name):
            raise ValueError(f"arm name {arm.name!r}: 1-40 lowercase letters, digits, '-', '_'")
        chosen = selector(arm.selector)
        if chosen.budgeted and arm.budget is None and arm.fraction is None and not arm.size_of:
            raise ValueError(f"arm {arm.name!r}: selector {arm.selector!r} keeps a budget: give "
                             "budget, fraction (or, for random, size_of)")
        if arm.size_of is not None and arm.size_of not in names:
            raise ValueError(f"arm {arm.name!r}: size_of names no arm ({arm.size_of!r})")
        if arm.size_of == arm.name:
            raise ValueError(f"arm {arm.name!r}: size_of cannot name the arm itself")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"arm names must differ: {', '.join(duplicates)} twice")
    if baseline is not None and baseline not in names:
        raise ValueError(f"experiment.baseline {baseline!r} is not an arm; arms: "
                         f"{', '.join(names)}")


@dataclass
class Selection:
    """One distinct selection: the arms that name it, its settings, dataset and model names."""

    name: str  # the first arm naming it
    key: str  # hash of the selection's settings over the pool
    arms: list[str]
    select: SelectConfig
    size_of: str | None  # another selection's name: as many as it kept
    settings: dict[str, Any]
    model: str = ""  # the model the arm is judged by (finetune/<model>/)
    dataset: str = ""  # the dataset published for it (datasets/<dataset>/vNNNN)
    baseline: bool = False
    needs: list[str] = field(default_factory=list)  # selection signals it reads
    sft_model: str = ""  # the supervised fine-tune (the model itself unless dpo)
    dpo: bool = False  # then DPO from sft_model on the pool run's pairs, as model


def selection_settings(arm: ArmConfig, config: GleanerConfig) -> dict[str, Any]:
    """What decides the selected set: the selector's own settings only (defaults resolved)."""
    from gleaner.tasks.select.selectors import selector

    chosen = selector(arm.selector)
    threshold = arm.threshold
    if threshold is None and chosen.own_threshold:
        threshold = config.rate.threshold
    out: dict[str, Any] = {"selector": arm.selector, "sort_by": arm.sort_by or chosen.default_sort,
                           "threshold": threshold}
    if chosen.budgeted:
        out.update(budget=arm.budget, fraction=arm.fraction)
    if chosen.needs_vectors:
        out["tau"] = arm.tau
    if arm.selector == "random":
        out["seed"] = arm.seed
    return out


def signals_read(settings: dict[str, Any], own_threshold: bool) -> list[str]:
    """The selection signals a selection reads (its sort column, the rating filter)."""
    needs = [settings["sort_by"]] if settings.get("sort_by") else []
    if settings.get("threshold") is not None and not own_threshold and "rating" not in needs:
        needs.append("rating")
    return needs


def model_settings(config: GleanerConfig) -> dict[str, Any]:
    """What decides a fine-tuned model besides its data: the shared recipe."""
    f = config.finetune
    return {"preset": f.preset, "base_model": f.base_model, "overrides": f.overrides,
            "use_gpu": f.use_gpu, "num_workers": f.num_workers}


def dpo_settings(config: GleanerConfig) -> dict[str, Any]:
    """What decides a DPO policy besides its start and its pairs."""
    d = config.dpo
    return {"beta": d.beta, "preset": d.preset, "overrides": d.overrides,
            "heldout_fraction": d.heldout_fraction, "seed": d.seed}


def plan_selections(config: GleanerConfig, pool_run: str) -> list[Selection]:
    """The distinct selections of the experiment's arms, in dependency order (``size_of``
    after the selection it names), with their dataset and model names."""
    from gleaner.tasks.select.selectors import selector

    exp = config.experiment
    baseline = exp.baseline or exp.arms[0].name
    by_arm = {a.name: a for a in exp.arms}
    done: dict[str, Selection] = {}  # arm name -> its selection
    order: list[Selection] = []

    def resolve(arm: ArmConfig, seen: tuple[str, ...] = ()) -> Selection:
        if arm.name in done:
            return done[arm.name]
        if arm.name in seen:
            raise ValueError(f"arms' size_of form a cycle: {' -> '.join((*seen, arm.name))}")
        settings = selection_settings(arm, config)
        size_of = resolve(by_arm[arm.size_of], (*seen, arm.name)) if arm.size_of else None
        if size_of is not None:
            settings["size_of"] = size_of.key
        base_key = settings_key({"pool": pool_run, **settings})[:8]
        key = settings_key({"selection": base_key, "dpo": dpo_settings(config)})[:8] \
            if arm.dpo else base_key
        same = next((s for s in order if s.key == key), None)
        if same is None:
            select = SelectConfig(selector=arm.selector, sort_by=arm.sort_by,
                                  budget=arm.budget or 0, tau=arm.tau, threshold=arm.threshold,
                                  seed=arm.seed, fraction=arm.fraction)
            chosen = selector(arm.selector)
            model_key = settings_key({"selection": base_key, **model_settings(config)})[:8]
            sft_model = f"{arm.name.removesuffix('-dpo') if arm.dpo else arm.name}-{model_key}"
            same = Selection(arm.name, key, [], select, size_of.name if size_of else None,
                             settings, f"{arm.name}-{key}" if arm.dpo else sft_model,
                             f"{exp.name}-{arm.name}-{key}",
                             needs=signals_read(settings, chosen.own_threshold),
                             sft_model=sft_model, dpo=arm.dpo)
            order.append(same)
        same.arms.append(arm.name)
        done[arm.name] = same
        return same

    for arm in exp.arms:
        resolve(arm)
    done[baseline].baseline = True
    return order


def arms_of(selections: list[Selection]) -> dict[str, Selection]:
    return {arm: s for s in selections for arm in s.arms}
