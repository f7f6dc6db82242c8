"""Recipe parameters of ``merge_method: lssf``: names, defaults, and validators.

Each validator raises a message that names the recipe field, so a pydantic error
raised deep inside mergekit's parameter resolution still says what is wrong.
No torch or mergekit import: the recipe checker and the CLI share this module.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from pydantic import BeforeValidator
from typing_extensions import Annotated, Literal

from .vocabulary import FUSIONS, RANK_RULES, ROUNDINGS, SPECTRA

#: Defaults, documented in the README (parameter table).
DEFAULT_ALPHA = 1.0
DEFAULT_ETA = 0.9
DEFAULT_MAX_RANK: Optional[int] = 256
DEFAULT_WEIGHT_MAX = 1.0
DEFAULT_RANK_RULE = "entropy"  # the paper's Eq. 7
DEFAULT_FUSION = "restore"  # beyond the paper, chosen on the safety testbed; "add" is the paper's Eq. 13
DEFAULT_SPECTRUM = "full"  # Eq. 5-7 over every singular value, as the paper; "signal": above the rounding edge
DEFAULT_ROUNDING = "subspace"  # 16-bit outputs keep the term's subspace through the cast; "nearest": plain cast

#: Every recipe-level parameter with its default, for summaries and model cards.
DEFAULTS = {
    "alpha": DEFAULT_ALPHA, "eta": DEFAULT_ETA, "max_rank": DEFAULT_MAX_RANK,
    "weight_max": DEFAULT_WEIGHT_MAX, "rank": None, "rank_rule": DEFAULT_RANK_RULE,
    "fusion": DEFAULT_FUSION, "subspace": None, "spectrum": DEFAULT_SPECTRUM,
    "rounding": DEFAULT_ROUNDING,
}
#: The parameters a weight's factors depend on (all but alpha, subspace and rounding).
FACTOR_PARAMETERS = ("eta", "max_rank", "rank", "weight_max", "rank_rule", "fusion", "spectrum")

#: Recipe-level parameters (``parameters:``), in the kernel's order.
SHARED_PARAMETERS = ("alpha", "eta", "max_rank", "weight_max", "rank", "rank_rule", "fusion", "subspace",
                     "spectrum", "rounding")
#: Per-model parameters (``models: - parameters:``).
PER_MODEL_PARAMETERS = ("role",)
ROLES = ("aligned", "unaligned")


class LSSFConfigError(ValueError):
    """A recipe or input that LSSF cannot merge; the message names the field."""


def one_per_role(roles: Dict[Any, str], context: str) -> Dict[str, Any]:
    """``{"aligned": key, "unaligned": key}`` from ``key -> role``: the one role check
    of the recipe check and of the merge method. Refuses anything but exactly one
    model per role; ``context`` ends the message (e.g. "the recipe has")."""
    by_role = {role: [key for key, value in roles.items() if value == role] for role in ROLES}
    for role, keys in by_role.items():
        if len(keys) != 1:
            raise LSSFConfigError(
                f"lssf needs exactly one model with `role: {role}`; {context} "
                f"{len(keys)}: {[str(k) for k in keys]}"
            )
    return {role: keys[0] for role, keys in by_role.items()}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"lssf parameter `{name}` must be a number, got {value!r}"
            ) from None
    if not math.isfinite(value):
        raise ValueError(f"lssf parameter `{name}` must be finite, got {value!r}")
    return float(value)


def _alpha(value: Any) -> float:
    return _number("alpha", value)


def _eta(value: Any) -> float:
    value = _number("eta", value)
    if not 0 < value <= 1:
        raise ValueError(f"lssf parameter `eta` must satisfy 0 < eta <= 1, got {value}")
    return value


def _weight_max(value: Any) -> float:
    value = _number("weight_max", value)
    if value < 1:
        raise ValueError(f"lssf parameter `weight_max` must be >= 1, got {value}")
    return value


def _rank_validator(name: str):
    def validate(value: Any) -> Optional[int]:
        if value is None:
            return None
        number = _number(name, value)
        # Gradients interpolate between integer endpoints; round to the nearest rank.
        rounded = int(round(number))
        if rounded < 1:
            raise ValueError(
                f"lssf parameter `{name}` must be an integer >= 1 (or null), got {value!r}"
            )
        return rounded

    return validate


def _subspace(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"lssf parameter `subspace` must be the path of a file made by "
            f"`mergekit-lssf calibrate`, got {value!r}"
        )
    return value


def _choice(name: str, allowed) -> Any:
    def validate(value: Any) -> str:
        if value not in allowed:
            raise ValueError(
                f"lssf parameter `{name}` must be one of {', '.join(allowed)}, got {value!r}"
            )
        return value

    return validate


def _role(value: Any) -> str:
    if value not in ROLES:
        raise ValueError(
            f"lssf per-model parameter `role` must be 'aligned' or 'unaligned', got {value!r}"
        )
    return value


Alpha = Annotated[float, BeforeValidator(_alpha)]
Eta = Annotated[float, BeforeValidator(_eta)]
WeightMax = Annotated[float, BeforeValidator(_weight_max)]
MaxRank = Annotated[Optional[int], BeforeValidator(_rank_validator("max_rank"))]
Rank = Annotated[Optional[int], BeforeValidator(_rank_validator("rank"))]
Subspace = Annotated[Optional[str], BeforeValidator(_subspace)]
RankRuleName = Annotated[str, BeforeValidator(_choice("rank_rule", RANK_RULES))]
FusionName = Annotated[str, BeforeValidator(_choice("fusion", FUSIONS))]
SpectrumName = Annotated[str, BeforeValidator(_choice("spectrum", SPECTRA))]
RoundingName = Annotated[str, BeforeValidator(_choice("rounding", ROUNDINGS))]
Role = Annotated[Literal["aligned", "unaligned"], BeforeValidator(_role)]
