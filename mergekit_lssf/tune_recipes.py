"""The recipes of ``mergekit-lssf tune``: the user's lssf recipe as a plain dict, what
``tune`` accepts of it, the grid of each family and each point's own recipe.

A point is one repair: ``lssf`` (the recipe's own fusion at one strength: ``alpha``,
or ``lam`` for ``fusion: contrastive``), ``interpolation`` (mergekit's ``linear`` at
weight ``l`` on the aligned model) or ``contrastive`` (``fusion: contrastive`` with
the calibration ``tune`` made, at one ``lam``). ``point_recipe`` writes the plain
mergekit recipe of a point; ``tune_points`` puts its weights in the model.

Grids run from the mildest repair to the strongest (``alpha`` and ``l`` up, ``lam``
down), without repeats (``measure.at_budget`` reads the curve in that order). Every
grid value of an lssf parameter goes through the merge's own rules
(``parameters.settings_from``), per planned tensor.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import yaml
from safetensors import safe_open

from mergekit_lssf.calibrate import Anchor, anchors_sha256
from mergekit_lssf.parameters import LSSFConfigError, settings_from
from mergekit_lssf.plan import LSSFPlan, tensor_parameters

FAMILIES = ("lssf", "interpolation", "contrastive")
#: The largest interpolation weight of the default grid: past half way to the aligned
#: model little of a fine-tune is left.
INTERPOLATION_MAX = 0.5
#: The default ``lam`` grid runs from LAM_MAX (mild) down to LAM_MIN (strong), log-spaced.
LAM_MAX, LAM_MIN = 30.0, 0.3
#: The recipe parameters that name files (their content is part of tune's settings).
FILE_PARAMETERS = ("subspace", "calibration")


@dataclass(frozen=True)
class Point:
    """One repair: ``family``, the swept ``parameter`` (``alpha``, ``lam`` or ``l``)
    and its ``value``."""

    family: str
    parameter: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.family} {self.parameter}={self.value:g}"


def swept_parameter(family: str, fusion: str) -> str:
    """What a family sweeps: ``l`` for interpolation, ``lam`` for contrastive (and for
    ``lssf`` on a contrastive recipe), else ``alpha``."""
    if family == "interpolation":
        return "l"
    return "lam" if family == "contrastive" or fusion == "contrastive" else "alpha"


def default_grid(parameter: str, points: int) -> list[float]:
    """``points`` values: ``alpha`` = i/N; ``l`` = INTERPOLATION_MAX * i/N (both to 4
    decimals); ``lam`` log-spaced from LAM_MAX down to LAM_MIN (3 significant digits)."""
    if parameter == "alpha":
        return [round(i / points, 4) for i in range(1, points + 1)]
    if parameter == "l":
        return [round(INTERPOLATION_MAX * i / points, 4) for i in range(1, points + 1)]
    ratio = LAM_MIN / LAM_MAX
    return [float(f"{LAM_MAX * ratio ** (i / (points - 1)):.3g}") for i in range(points)]


def mild_to_strong(parameter: str, values) -> list[float]:
    """``values`` without repeats, from the mildest repair to the strongest: ``lam``
    down (a larger ``lam`` keeps more of the fine-tune), ``alpha`` and ``l`` up."""
    return sorted({float(v) for v in values}, reverse=parameter == "lam")


def check_grid_value(family: str, parameter: str, value: float, plan: LSSFPlan, calibration: str) -> None:
    """Refuse (one line) a value the merge would refuse: an lssf parameter through
    ``settings_from`` with every planned tensor's own parameters (the ``contrastive``
    family: with ``fusion: contrastive`` and tune's ``calibration``); ``l`` in (0, 1)."""
    where = f"--grid {family}: {value:g}"
    if parameter == "l":
        if not (math.isfinite(value) and 0 < value < 1):
            raise LSSFConfigError(f"{where}: l (the weight on the aligned model) must satisfy 0 < l < 1")
        return
    if family == "contrastive":
        settings_from({"fusion": "contrastive", "calibration": calibration, parameter: value}, where)
        return
    seen = set()
    for task in plan.tensors:
        values = {**tensor_parameters(task), parameter: value}
        key = repr(sorted(values.items()))
        if key not in seen:
            seen.add(key)
            settings_from(values, f"{where} (tensor {task.output_weight.name})")


# ---------------------------------------------------------------- the user's recipe


def read_doc(path: str) -> dict[str, Any]:
    """The recipe at ``path`` as a plain dict, as the user wrote it."""
    with open(path, encoding="utf-8") as fp:
        return yaml.safe_load(fp)


def check_tune_recipe(path: str, doc: dict[str, Any], families) -> None:
    """What ``tune`` needs of an lssf recipe, one line each: ``base_model`` and
    ``models:`` (not ``slices:`` or ``modules:``) with one ``role: aligned`` model, and,
    for the ``lssf`` family, one value of the swept parameter for every tensor (a
    point sets it for the whole recipe; filters or gradients would be flattened)."""
    shape = [k for k in ("slices", "modules") if doc.get(k)]
    if shape:
        raise LSSFConfigError(f"tune: {path} lists its models under `{shape[0]}:`; tune needs a recipe with "
                              "`base_model` (the fine-tune) and `models:` with one `role: aligned` model")
    if not doc.get("base_model"):
        raise LSSFConfigError(f"tune: {path} has no `base_model` (the fine-tune whose repairs tune measures)")
    aligned = [m for m in doc.get("models") or [] if ((m or {}).get("parameters") or {}).get("role") == "aligned"]
    if len(aligned) != 1:
        raise LSSFConfigError(f"tune: {path} needs exactly one model with `role: aligned` (the model whose refusals "
                              f"the repairs win back) under `models:`; it has {len(aligned)}")
    parameters = doc.get("parameters") or {}
    fusion = parameters.get("fusion", "restore")
    if not isinstance(fusion, str):
        raise LSSFConfigError(f"tune: {path}: `fusion` varies by tensor (filters or gradients); tune sweeps one "
                              "fusion: give one value")
    swept = swept_parameter("lssf", fusion)
    if "lssf" in families and isinstance(parameters.get(swept), (list, dict)):
        raise LSSFConfigError(f"tune: {path}: `{swept}` varies by tensor (filters or gradients), and each lssf point "
                              f"sets one `{swept}` for every tensor; give one number (or leave it out), or run "
                              "--families interpolation,contrastive")


def aligned_and_base(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The ``role: aligned`` entry of an lssf recipe dict and its ``base_model``."""
    aligned = [m for m in doc.get("models") or [] if (m.get("parameters") or {}).get("role") == "aligned"]
    return aligned[0], doc["base_model"]


def with_tokenizer_source(doc: dict[str, Any], plan: LSSFPlan) -> dict[str, Any]:
    """``doc`` with the ``tokenizer_source: base`` the plan adds for a fine-tune with
    added tokens (mergekit's planner rewrites ``plan.config`` in place)."""
    if plan.config.tokenizer_source == "base" and not (doc.get("tokenizer_source") or doc.get("tokenizer")):
        return {**doc, "tokenizer_source": "base"}
    return doc


def _values(setting: Any) -> list:
    """Every literal of a recipe setting: the value itself, or those of its filters."""
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    if isinstance(setting, dict):
        return _values(setting.get("value"))
    return [setting] if setting is not None else []


def referenced_files(doc: dict[str, Any]) -> dict[str, str]:
    """``{path: sha256 of its content}`` of every file the recipe's ``subspace:`` and
    ``calibration:`` name (a missing file: ``"missing"``; the plan refuses it)."""
    out = {}
    for name in FILE_PARAMETERS:
        for path in _values((doc.get("parameters") or {}).get(name)):
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as fp:
                    for block in iter(lambda: fp.read(1 << 20), b""):
                        digest.update(block)
                out[str(path)] = digest.hexdigest()
            except OSError:
                out[str(path)] = "missing"
    return out


def check_calibration_rows(doc: dict[str, Any], task: list[Anchor], measured: list[int], task_path: str) -> None:
    """Refuse a ``fusion: contrastive`` recipe whose ``calibration:`` file was made from
    the task rows tune would measure utility on (its ``task_sha256`` is the hash of
    TASK, or of the measurement rows)."""
    hashes = {anchors_sha256(task), anchors_sha256([task[i] for i in measured])}
    for path in _values((doc.get("parameters") or {}).get("calibration")):
        try:
            with safe_open(path, framework="pt") as handle:
                made_from = (handle.metadata() or {}).get("task_sha256")
        except Exception:  # not there or not safetensors: the plan says so
            continue
        if made_from in hashes:
            raise LSSFConfigError(
                f"tune: {path} was calibrated on the rows of {task_path} (its task_sha256 is theirs), so utility would "
                "be measured on the rows the repair was fitted to; run --families contrastive (tune calibrates on one "
                "half of TASK and measures on the other) or use a calibration made from other rows")


# ---------------------------------------------------------------- the points' recipes


def contrastive_doc(doc: dict[str, Any], calibration: str) -> dict[str, Any]:
    """``doc`` (an lssf recipe) turned into ``fusion: contrastive`` with ``calibration``:
    the aligned model only, the recipe's ``round_to``/``rounding`` kept."""
    aligned, _base = aligned_and_base(doc)
    kept = {k: v for k, v in (doc.get("parameters") or {}).items() if k in ("round_to", "rounding")}
    return {**doc, "models": [aligned], "parameters": {"fusion": "contrastive", "calibration": calibration, **kept}}


def point_recipe(doc: dict[str, Any], point: Point) -> dict[str, Any]:
    """The plain mergekit recipe of ``point``: ``doc`` is the lssf recipe as mergekit
    runs it (for ``lssf``) or as ``contrastive_doc`` made it (for ``contrastive``);
    interpolation is mergekit's ``linear`` (weight ``1 - l`` on the fine-tune)."""
    if point.family != "interpolation":
        return {**doc, "parameters": {**(doc.get("parameters") or {}), point.parameter: point.value}}
    aligned, base = aligned_and_base(doc)
    linear: dict[str, Any] = {"merge_method": "linear", "models": [
        {"model": base, "parameters": {"weight": round(1 - point.value, 12)}},
        {"model": aligned["model"], "parameters": {"weight": point.value}}]}
    if doc.get("tokenizer_source") or doc.get("tokenizer"):  # the fine-tune's vocabulary: it is the base
        linear["base_model"] = base
    for field in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
        if doc.get(field) is not None:
            linear[field] = doc[field]
    return linear


def recipe_text(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


__all__ = ["FAMILIES", "Point", "aligned_and_base", "check_calibration_rows", "check_grid_value", "check_tune_recipe",
           "contrastive_doc", "default_grid", "mild_to_strong", "point_recipe", "read_doc", "recipe_text",
           "referenced_files", "swept_parameter", "with_tokenizer_source"]
