"""``mergekit-lssf check``: what a recipe will do, in seconds, before any spectrum.

Runs the merge's own pre-flight check (``recipe.prepare_recipe``), plans the recipe
with mergekit's planner and reads only safetensors headers: every output tensor is
listed as fused, with its effective parameters after filters and gradients, or kept
from the fine-tune, with the reason. Includes the role-swap warning.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import TensorMetadata
from mergekit.options import MergeOptions

from mergekit_lssf.merge_method import might_be_fused
from mergekit_lssf.parameters import FACTOR_PARAMETERS, PER_MODEL_PARAMETERS
from mergekit_lssf.recipe import check_recipe, dtype_warning, prepare_recipe, role_check, safetensors_index
from mergekit_lssf.traversal import planned_tensors

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def check(config: MergeConfiguration) -> Dict[str, List]:
    """``{"fused": [...], "kept": [...], "warnings": [...]}`` for ``config``."""
    options = MergeOptions(quiet=True)
    config = prepare_recipe(config, trust_remote_code=options.trust_remote_code, warn=False)
    refs = check_recipe(config, trust_remote_code=options.trust_remote_code)
    warnings = [w for w in [role_check(config, refs), dtype_warning(config, refs)] if w]
    headers: Dict[str, Tuple[List[int], str]] = safetensors_index(config.base_model) or {}
    if not headers:
        warnings.append(f"lssf: {config.base_model} is not a local safetensors folder: shapes are not known "
                        "before loading, so 2-D weights are listed as fused")
    fused, kept = [], []
    for task in planned_tensors(config, options):
        name = task.output_weight.name
        shape, dtype = headers.get(name, (None, None))
        reason = _kept_reason(TensorMetadata.from_weight_info(task.output_weight), shape, dtype)
        if reason:
            kept.append({"name": name, "reason": reason})
            continue
        params = {k: _plain(v) for k, v in task.parameters.items() if k not in PER_MODEL_PARAMETERS}
        fused.append({"name": name, "shape": shape, "parameters": {k: params.get(k) for k in ("alpha",) + FACTOR_PARAMETERS + ("subspace",)}})
    return {"fused": fused, "kept": kept, "warnings": warnings}


def _kept_reason(metadata, shape: Optional[List[int]], dtype: Optional[str]) -> Optional[str]:
    if not might_be_fused(metadata):
        return "vocabulary"
    if shape is not None and len(shape) != 2:
        return "1-D" if len(shape) == 1 else f"{len(shape)}-D"
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return "not floating point"
    return None


def table(result: Dict[str, List]) -> str:
    """The check as text for people: one line per tensor, then a summary."""
    lines = []
    for row in result["fused"]:
        p = row["parameters"]
        shape = "x".join(map(str, row["shape"])) if row["shape"] else "?"
        rank = f"rank {p['rank']}" if p["rank"] is not None else (
            f"{p['rank_rule']} (eta {p['eta']:g}, max_rank {p['max_rank']})" if p["rank_rule"] == "entropy"
            else f"noise_floor (max_rank {p['max_rank']})")
        lines.append(f"fused  {row['name']:48s} {shape:>11s}  alpha {p['alpha']:g}, {rank}, "
                     f"weight_max {p['weight_max']:g}, fusion {p['fusion']}" + (f", subspace {p['subspace']}" if p["subspace"] else ""))
    for row in result["kept"]:
        lines.append(f"kept   {row['name']:48s} ({row['reason']})")
    lines.append(f"{len(result['fused'])} tensors fused, {len(result['kept'])} kept from the fine-tune")
    lines += result["warnings"]
    return "\n".join(lines)

