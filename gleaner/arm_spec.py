"""Arms of an experiment in short form, and the checks a grid's arms must pass.

An arm is a selector with its settings (docs/experiments.md). The short form is
``<selector>[@<setting>][+dpo]``:

    full                 every example of the pool
    random@9k            9,000 at random (``k`` = thousand; ``9000`` works too)
    alpagasus@τ4.5       AlpaGasus: rating >= 4.5 (``t4.5``, ``tau4.5``; alone: rate.threshold)
    deita@6k             DEITA's score-first, diversity-aware 6,000 (``deita@τ0.8`` sets its tau)
    ifd@5%               IFD: drop IFD > 1, keep the top 5 % of the pool
    longest@1k           Long-is-more: the 1,000 longest responses (tokens)
    alpagasus@τ4.5+dpo   the same fine-tune, then DPO on the pool run's comparison pairs

Its name is the short form made path-safe (``alpagasus-t4_5``, ``ifd-5pct``,
``alpagasus-t4_5-dpo``). Read when the config is validated (gleaner.config.ArmConfig);
which arms share a selection and a model is gleaner.tasks.experiment.arms.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gleaner.config import ArmConfig

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
        fields["size"] = int(number)
    elif match := _FRACTION.match(setting):
        fields["fraction"] = float(match.group(1)) / 100
    elif match := _TAU.match(setting):
        fields["tau" if uses_tau(fields["selector"]) else "threshold"] = float(match.group(1))
    else:
        raise ValueError(f"arm {value!r}: after '@' comes a size (9k, 1000), a share of the pool "
                         f"(5%) or a threshold (τ4.5), not {setting!r}")
    return fields


def uses_tau(selector: str) -> bool:
    """Whether ``@τ`` sets the selector's diversity threshold (else a score threshold); an
    unknown selector is left to the config's own check, which names the known ones."""
    from gleaner.registry import registry

    return selector in registry("selector") and registry("selector").get(selector).uses_tau


def check_arms(arms: list[ArmConfig], baseline: str | None) -> None:
    """Names unique and path-safe, the baseline and ``size_of`` name arms, sizes given (a
    selector says itself whether it keeps a budget: its ``budgeted`` trait)."""
    from gleaner.registry import registry

    names = [a.name for a in arms]
    for arm in arms:
        if not NAME_RE.match(arm.name):
            raise ValueError(f"arm name {arm.name!r}: 1-40 lowercase letters, digits, '-', '_'")
        chosen = registry("selector").get(arm.selector)
        if chosen.budgeted and arm.size is None and arm.fraction is None and not arm.size_of:
            raise ValueError(f"arm {arm.name!r}: selector {arm.selector!r} keeps a budget: give "
                             "size, fraction (or, for random, size_of)")
        if arm.size_of is not None and not chosen.sized_like_another:
            raise ValueError(f"arm {arm.name!r}: selector {arm.selector!r} cannot keep as many "
                             "as another arm (size_of)")
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
