"""Recipe parameters of ``merge_method: lssf``, each declared once.

``PARAMETERS`` is the one declaration: name, kind, allowed range, default and a
one-line doc per parameter. Everything else reads it: the merge method's spec (the
parameters mergekit binds, ``merge_method.LSSF_METHOD``), the recipe check and
``check``, the validators mergekit runs on every value (also in
``merge_state_dicts``), the rules between parameters (``settings_from``), and the
README's parameter table (a test compares the two).

Each validator raises a message that names the parameter, the value and the allowed
range, so a pydantic error raised deep inside mergekit's parameter resolution still
says what is wrong. No torch or mergekit import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pydantic import BeforeValidator
from typing_extensions import Annotated

from .vocabulary import FUSIONS, RANK_RULES, ROUNDINGS, ROUND_TO, SPECTRA

#: ``alpha``'s bound for ``fusion: add``; ``restore`` stops at 1 (the aligned weights).
ALPHA_MAX = 2.0
#: The paper tunes ``alpha`` in about 0.5-1.0; ``add`` beyond this warns.
ALPHA_PAPER_MAX = 1.0
#: ``weight_max``'s bound (Eq. 10): the leading direction carries ``weight_max**2``.
WEIGHT_MAX_MAX = 10.0

ROLES = ("aligned", "unaligned")


class LSSFConfigError(ValueError):
    """A recipe or input that LSSF cannot merge; the message names the field."""


@dataclass(frozen=True)
class Parameter:
    """One lssf parameter: how a recipe writes it and which values it may take.

    kind: ``"number"`` (float), ``"integer"`` (gradients round to the nearest
    integer), ``"choice"`` (one of ``choices``) or ``"path"`` (a file). ``low`` /
    ``high``: the bounds (``*_open``: strict); ``nullable``: None is allowed (the
    default when ``default`` is None; a recipe cannot write null, since mergekit
    drops it, so it gets None by leaving the field out). ``per_model``: set under each model's
    ``parameters:`` (``role``), else under the recipe's.
    """

    name: str
    kind: str
    default: Any
    doc: str
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = False
    choices: Tuple[str, ...] = ()
    nullable: bool = False
    per_model: bool = False
    required: bool = False

    def range_words(self) -> str:
        """The allowed values in words, e.g. ``0 < alpha <= 2`` or ``one of add, restore``."""
        if self.kind == "choice":
            words = "one of " + ", ".join(self.choices)
        elif self.kind == "path":
            words = "a file path"
        elif self.kind == "integer" and self.high is None:
            words = f"an integer >= {_num(self.low)}"
        else:
            low = f"{_num(self.low)} {'<' if self.low_open else '<='} " if self.low is not None else ""
            high = f" {'<' if self.high_open else '<='} {_num(self.high)}" if self.high is not None else ""
            words = f"{low}{self.name}{high}"
        return words

    def validate(self, value: Any) -> Any:
        """The value as the method reads it; ``ValueError`` naming the parameter,
        the value and the range when it is not allowed."""
        if value is None and self.nullable:
            return None
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(self._refusal(value))
            return value
        if self.kind == "path":
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"lssf parameter `{self.name}` must be the path of a file made by "
                                 f"`mergekit-lssf calibrate`, got {value!r}")
            return value
        number = self._number(value)
        if self.kind == "integer":
            number = int(round(number))  # gradients interpolate between integer endpoints
        if not self._in_range(number):
            raise ValueError(self._refusal(value))
        return number

    def _number(self, value: Any) -> float:
        if isinstance(value, bool) or value is None:
            raise ValueError(self._refusal(value))
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(self._refusal(value)) from None
        if not math.isfinite(number):
            raise ValueError(self._refusal(value))
        return number

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        if self.high is not None and (number >= self.high if self.high_open else number > self.high):
            return False
        return True

    def _refusal(self, value: Any) -> str:
        scope = "per-model parameter" if self.per_model else "parameter"
        verb = "satisfy" if self.kind == "number" else "be"
        return f"lssf {scope} `{self.name}` must {verb} {self.range_words()}, got {value!r}"

    @property
    def annotation(self) -> Any:
        """The type mergekit binds (``ParameterSpec.value_type``): validated by ``validate``."""
        python_type = {"number": float, "integer": Optional[int] if self.nullable else int}.get(
            self.kind, Optional[str] if self.nullable else str)
        if self.kind == "number" and self.nullable:
            python_type = Optional[float]
        return Annotated[python_type, BeforeValidator(self.validate)]


def _num(value: float) -> str:
    return f"{value:g}"


#: The one declaration of every lssf parameter, in the order the docs list them.
PARAMETERS: Tuple[Parameter, ...] = (
    Parameter("role", "choice", None, "per model: `aligned` or `unaligned`, exactly one of each",
              choices=ROLES, per_model=True, required=True),
    Parameter("fusion", "choice", "restore",
              "`restore`: pull back to the aligned weights inside the subspace; `add`: the paper's Eq. 13; "
              "`contrastive`: the data-aware repair of a `calibration` file", choices=FUSIONS),
    Parameter("alpha", "number", 1.0,
              f"fusion coefficient (Eq. 13); at most 1 with `restore` (1 reaches the aligned weights inside "
              f"the subspace), at most {_num(ALPHA_MAX)} with `add` (a warning above the paper's {_num(ALPHA_PAPER_MAX)})",
              low=0.0, low_open=True, high=ALPHA_MAX),
    Parameter("eta", "number", 0.9, "share of the spectral entropy the rank keeps (Eq. 7); `contrastive` reads it "
              "with `rank_rule: entropy` only",
              low=0.0, low_open=True, high=1.0),
    Parameter("max_rank", "integer", 256, "cap on the entropy rank; on bf16 checkpoints it usually decides the rank "
              "(no cap: a value at least the weight's smaller side)", low=1, nullable=True),
    Parameter("rank", "integer", None, "a fixed rank instead of the rule (not capped; `contrastive`: the leading "
              "`rank` stored vectors, at most as many as stored); unset: the rule",
              low=1, nullable=True),
    Parameter("rank_rule", "choice", None,
              "`entropy` (Eq. 5-7) or `noise_floor` (Gavish-Donoho threshold; may give rank 0); unset: `entropy` for "
              "`restore`/`add`, every stored vector for `contrastive` (which reads `entropy` only: Eq. 5-7 over mu)",
              choices=RANK_RULES, nullable=True),
    Parameter("weight_max", "number", 1.0,
              "weight of the leading direction (Eq. 10-11); 1 = plain projector", low=1.0, high=WEIGHT_MAX_MAX),
    Parameter("subspace", "path", None, "a file from `mergekit-lssf calibrate`; unset: the SVD of `delta`",
              nullable=True),
    Parameter("calibration", "path", None, "`contrastive` only, required: a file from `mergekit-lssf calibrate RECIPE "
              "--task`", nullable=True),
    Parameter("lam", "number", 3.0, "`contrastive` only: weight of the task term; larger keeps more of the "
              "fine-tune (each direction is rolled back by mu / (mu + lam))", low=0.0, low_open=True),
    Parameter("spectrum", "choice", "full",
              "`full`: Eq. 5-7 over every singular value; `signal`: on 16-bit inputs only those above the "
              "rounding edge", choices=SPECTRA),
    Parameter("round_to", "choice", None,
              "the 16-bit dtype lssf rounds its output to, equal to the recipe's `out_dtype`; unset: no rounding "
              "by lssf (mergekit's writer casts to nearest)", choices=ROUND_TO, nullable=True),
    Parameter("rounding", "choice", "subspace",
              "how `round_to` rounds: `subspace` keeps the term's subspace through the cast; `nearest` = plain cast",
              choices=ROUNDINGS),
)
BY_NAME: Dict[str, Parameter] = {p.name: p for p in PARAMETERS}

#: Recipe-level parameters (``parameters:``) and per-model ones (``models: - parameters:``).
SHARED_PARAMETERS = tuple(p.name for p in PARAMETERS if not p.per_model)
PER_MODEL_PARAMETERS = tuple(p.name for p in PARAMETERS if p.per_model)
#: Every recipe-level parameter with its default, for summaries and model cards.
DEFAULTS = {p.name: p.default for p in PARAMETERS if not p.per_model}
DEFAULT_ALPHA = DEFAULTS["alpha"]
DEFAULT_ETA = DEFAULTS["eta"]
DEFAULT_MAX_RANK: Optional[int] = DEFAULTS["max_rank"]
#: The rule ``restore`` and ``add`` apply when ``rank_rule`` is unset (the paper's Eq. 7);
#: unset, ``contrastive`` uses every stored vector (``effective_rank_rule``).
DEFAULT_RANK_RULE = "entropy"
DEFAULT_FUSION = DEFAULTS["fusion"]  # beyond the paper, chosen on the safety testbed; "add" is Eq. 13


def effective_rank_rule(fusion: Any, rank_rule: Optional[str]) -> Optional[str]:
    """The rank rule a tensor of ``fusion`` applies: ``rank_rule`` when set; unset, the
    paper's entropy rule for ``restore``/``add`` and None for ``contrastive`` (every
    vector the calibration stores, or ``rank``)."""
    if rank_rule is not None or fusion == "contrastive":
        return rank_rule
    return DEFAULT_RANK_RULE


@dataclass(frozen=True)
class FusionSettings:
    """The effective parameters of one fused tensor, after the rules between them.

    Built by ``settings_from``; the merge method, ``check`` and the recipe check all
    go through it, so they accept and refuse the same values. The kernel
    (``kernel.lssf_fuse``, ``kernel.safety_factors``) takes it as it is; ``subspace``
    (a file path) is read by the mergekit glue, which passes the kernel the basis.
    """

    fusion: str  # no default: a recipe's is ``restore`` (settings_from fills it), the paper's ``add``
    alpha: float = DEFAULTS["alpha"]
    eta: float = DEFAULTS["eta"]
    max_rank: Optional[int] = DEFAULTS["max_rank"]
    rank: Optional[int] = DEFAULTS["rank"]
    rank_rule: Optional[str] = DEFAULTS["rank_rule"]  # resolved by effective_rank_rule
    weight_max: float = DEFAULTS["weight_max"]
    subspace: Optional[str] = DEFAULTS["subspace"]
    calibration: Optional[str] = DEFAULTS["calibration"]
    lam: float = DEFAULTS["lam"]
    spectrum: str = DEFAULTS["spectrum"]
    round_to: Optional[str] = DEFAULTS["round_to"]
    rounding: str = DEFAULTS["rounding"]

    def __post_init__(self) -> None:
        """Every value against its declaration, then the rules between them: the
        kernel gets nothing a recipe would be refused for (``ValueError``)."""
        for f in fields(self):
            value = BY_NAME[f.name].validate(getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        object.__setattr__(self, "rank_rule", effective_rank_rule(self.fusion, self.rank_rule))
        errors, _warnings = combination_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if errors:
            raise ValueError(errors[0])


#: Parameters of the data-free subspace that ``fusion: contrastive`` does not read
#: (``eta`` is read with ``rank_rule: entropy`` only; ``rank_rule: noise_floor`` never).
CONTRASTIVE_UNREAD = ("max_rank", "weight_max", "spectrum")


def combination_problems(values: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """``(errors, warnings)`` of the rules between parameters, for one set of
    effective values (defaults filled in): ``alpha`` at most 1 with ``restore``;
    ``add`` above the paper's range warns; ``spectrum: signal`` needs the entropy rule."""
    errors, warnings = [], []
    fusion, alpha = values.get("fusion", DEFAULT_FUSION), values.get("alpha", DEFAULT_ALPHA)
    if fusion == "restore" and alpha is not None and alpha > 1:
        errors.append(f"lssf parameter `alpha` must satisfy 0 < alpha <= 1 with `fusion: restore` "
                      f"(above 1 it overshoots the aligned model), got {alpha!r}")
    if fusion == "add" and alpha is not None and alpha > ALPHA_PAPER_MAX:
        warnings.append(f"lssf: warning: `alpha: {alpha:g}` with `fusion: add` is beyond the paper's range "
                        f"(about 0.5-{_num(ALPHA_PAPER_MAX)}); check generation with `mergekit-lssf eval`")
    if fusion == "contrastive" and alpha is not None and alpha > 1:
        errors.append(f"lssf parameter `alpha` must satisfy 0 < alpha <= 1 with `fusion: contrastive` "
                      f"(above 1 it overshoots the aligned model), got {alpha!r}")
    if fusion == "contrastive" and not values.get("calibration"):
        errors.append("`fusion: contrastive` needs `calibration: FILE`, written by `mergekit-lssf calibrate RECIPE "
                      "--task TASK.jsonl`")
    if fusion == "contrastive" and values.get("subspace"):
        errors.append("`subspace` is an Eq. 4 file for `restore`/`add`; `fusion: contrastive` reads `calibration`")
    if fusion == "contrastive":
        unread = [n for n in CONTRASTIVE_UNREAD if n in values and values[n] != DEFAULTS[n]]
        if values.get("rank_rule") not in (None, "entropy"):
            unread.insert(0, "rank_rule")
        elif values.get("rank_rule") is None and "eta" in values and values["eta"] != DEFAULTS["eta"]:
            unread.insert(0, "eta")
        if unread:
            errors.append(f"`{unread[0]}: {values[unread[0]]}` is not read by `fusion: contrastive` (it takes "
                          "`calibration`, `lam`, `rank` or `rank_rule: entropy` with `eta`, `alpha` and the "
                          "rounding); remove it")
    if fusion != "contrastive" and values.get("lam", DEFAULTS["lam"]) != DEFAULTS["lam"]:
        errors.append(f"`lam` is read by `fusion: contrastive` only, not `fusion: {fusion}`")
    if fusion != "contrastive" and values.get("calibration"):
        errors.append(f"`calibration` is read by `fusion: contrastive` only, not `fusion: {fusion}`")
    if values.get("spectrum") == "signal" and (values.get("rank") is not None
                                                or values.get("rank_rule") == "noise_floor"):
        errors.append("`spectrum: signal` applies the entropy rule above the rounding edge; it does nothing "
                      "with a fixed `rank` or `rank_rule: noise_floor`")
    return errors, warnings


def settings_from(values: Mapping[str, Any], where: str = "lssf") -> FusionSettings:
    """The ``FusionSettings`` of one tensor from its bound parameter values (any
    missing one takes its default); each value is validated against its declaration
    and the rules between them are applied. ``LSSFConfigError`` names ``where``."""
    given = {f.name: values.get(f.name, DEFAULTS[f.name]) for f in fields(FusionSettings)}
    try:
        return FusionSettings(**given)
    except ValueError as error:
        raise LSSFConfigError(f"{where}: {error}") from None


def one_per_role(roles: Dict[Any, str], context: str, required: Tuple[str, ...] = ROLES) -> Dict[str, Any]:
    """``{"aligned": key, "unaligned": key}`` from ``key -> role``: the one role check
    of the recipe check and of the merge method. Each role in ``required`` needs
    exactly one model; another role at most one (None when absent: ``fusion:
    contrastive`` needs no unaligned model). ``context`` ends the message (e.g. "the
    recipe has")."""
    by_role = {role: [key for key, value in roles.items() if value == role] for role in ROLES}
    for role, keys in by_role.items():
        if len(keys) != 1 and (role in required or keys):
            raise LSSFConfigError(
                f"lssf needs exactly one model with `role: {role}`; {context} "
                f"{len(keys)}: {[str(k) for k in keys]}"
            )
    return {role: keys[0] if keys else None for role, keys in by_role.items()}


def required_roles(fusions) -> Tuple[str, ...]:
    """The roles a merge needs when its tensors use ``fusions``: ``restore`` and ``add``
    need both, ``contrastive`` only the aligned model."""
    return ROLES if set(fusions) - {"contrastive"} else ("aligned",)


def readme_table() -> str:
    """The README's parameter table, from ``PARAMETERS`` (a test compares them)."""
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|",
            "| `base_model` | required | a model, or `model+lora` | the fine-tune to repair |"]
    for p in PARAMETERS:
        default = "required" if p.required else ("null" if p.default is None else f"`{p.default}`")
        rows.append(f"| `{p.name}` | {default} | {p.range_words()} | {p.doc} |")
    return "\n".join(rows)
