"""Which arms of an experiment share a selection and a model (the short form and its checks
are gleaner.arm_spec, read when the config is validated).

Arms whose selections are the same (same selector and settings over the same
pool) share one selection, one dataset version and one fine-tuned model: the
identity is a hash of those settings, and the model's also of the recipe. A DPO
arm is its own selection (its model differs) whose fine-tune is the one its twin
without ``+dpo`` trains (the same name: trained once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gleaner.config import ArmConfig, GleanerConfig, SelectConfig
from gleaner.engine.plan import settings_key


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
    base_key: str = ""  # the selection's key without DPO (its twin's key)


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
        out.update(budget=arm.size, fraction=arm.fraction)
    if chosen.uses_tau:
        out["tau"] = arm.tau
    if chosen.uses_seed:
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
                                  size=arm.size or 0, tau=arm.tau, threshold=arm.threshold,
                                  seed=arm.seed, fraction=arm.fraction)
            chosen = selector(arm.selector)
            model_key = settings_key({"selection": base_key, **model_settings(config)})[:8]
            sft_model = f"{arm.name.removesuffix('-dpo') if arm.dpo else arm.name}-{model_key}"
            same = Selection(arm.name, key, [], select, size_of.name if size_of else None,
                             settings, f"{arm.name}-{key}" if arm.dpo else sft_model,
                             f"{exp.name}-{arm.name}-{key}",
                             needs=signals_read(settings, chosen.own_threshold),
                             sft_model=sft_model, dpo=arm.dpo, base_key=base_key)
            order.append(same)
        same.arms.append(arm.name)
        done[arm.name] = same
        return same

    for arm in exp.arms:
        resolve(arm)
    for selection in order:  # a DPO arm's fine-tune is its twin's, whatever the twin's name
        twin = next((s for s in order if not s.dpo and s.key == selection.base_key), None)
        if selection.dpo and twin is not None:
            selection.sft_model = twin.sft_model
    done[baseline].baseline = True
    return order


def arms_of(selections: list[Selection]) -> dict[str, Selection]:
    return {arm: s for s in selections for arm in s.arms}
