"""``mergekit-lssf check``: what a recipe will do, in seconds, before any spectrum.

Reads the recipe's one plan (``plan.plan_recipe``: the merge's own pre-flight check,
so ``check`` and ``mergekit-yaml`` refuse the same recipes with the same errors),
plans the tensors with mergekit's planner and reads only safetensors headers: every
output tensor is listed as fused, with its effective parameters after filters and
gradients (checked by the rules the merge method applies), or kept from the
fine-tune, with the reason. Includes the plan's warnings.
"""

from __future__ import annotations

from typing import Any, Dict, List

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from mergekit_lssf.fused import kept_reason
from mergekit_lssf.guards import model_index
from mergekit_lssf.layout import parameter_layout
from mergekit_lssf.parameters import SHARED_PARAMETERS, effective_rank_rule
from mergekit_lssf.plan import LSSFPlan, tensor_parameters


def _shapes(config: MergeConfiguration, refs: Dict[str, Any]):
    """The tensor headers that tell each output tensor's shape, and whose they are: the
    fine-tune's; else, for ``model+lora``, those of the model under the adapter (a LoRA
    merge keeps every shape); else the aligned model's (the roles must match in shape)."""
    base = config.base_model
    under_adapter = ModelReference(model=base.model) if getattr(base, "lora", None) is not None else None
    for ref in (base, under_adapter, refs["aligned"]):
        headers = model_index(ref) if ref is not None else None
        if headers:
            return headers, ref
    return {}, None


def check(plan: LSSFPlan) -> Dict[str, List]:
    """``{"fused": [...], "kept": [...], "warnings": [...]}`` for a planned recipe."""
    config, refs = plan.config, plan.refs
    warnings = list(plan.warnings)
    headers, source = _shapes(config, refs)
    if not headers:
        warnings.append(f"lssf: {config.base_model} is not a local safetensors folder: shapes are not known "
                        "before loading, so 2-D weights are listed as fused")
    elif source is not config.base_model:
        warnings.append(f"lssf: shapes read from {source} ({config.base_model} is not a local safetensors folder; "
                        "the recipe's models share their shapes)")
    fused, kept = [], []
    for task in plan.tensors:
        name = task.output_weight.name
        stored = headers.get(name)
        shape = list(stored.shape) if stored else None
        reason = kept_reason(name, shape, stored.floating if stored else None, task.output_weight.vocabulary_axis,
                             layout=parameter_layout(config.base_model, name))
        if reason:
            kept.append({"name": name, "reason": reason})
            continue
        params = tensor_parameters(task)  # checked by the plan with the method's own rules
        params = {k: params.get(k) for k in SHARED_PARAMETERS}
        params["rank_rule"] = effective_rank_rule(params["fusion"], params["rank_rule"])  # unset: by fusion
        fused.append({"name": name, "shape": shape, "parameters": params})
    return {"fused": fused, "kept": kept, "warnings": warnings}


def table(result: Dict[str, List]) -> str:
    """The check as text for people: one line per tensor, then a summary."""
    lines = []
    for row in result["fused"]:
        p = row["parameters"]
        shape = "x".join(map(str, row["shape"])) if row["shape"] else "?"
        rank = f"rank {p['rank']}" if p["rank"] is not None else (
            f"{p['rank_rule']} (eta {p['eta']:g}, max_rank {p['max_rank']})" if p["rank_rule"] == "entropy"
            else f"noise_floor (max_rank {p['max_rank']})")
        if p["fusion"] == "contrastive":
            k = f"k {p['rank']}" if p["rank"] is not None else (
                f"k by the entropy rule over mu (eta {p['eta']:g})" if p["rank_rule"] == "entropy" else "every stored vector")
            lines.append(f"fused  {row['name']:48s} {shape:>11s}  alpha {p['alpha']:g}, fusion contrastive, lam "
                         f"{p['lam']:g}, {k}, calibration {p['calibration']}"
                         + (f", round_to {p['round_to']} ({p['rounding']})" if p.get("round_to") else ""))
            continue
        lines.append(f"fused  {row['name']:48s} {shape:>11s}  alpha {p['alpha']:g}, {rank}, "
                     f"weight_max {p['weight_max']:g}, fusion {p['fusion']}" + (f", subspace {p['subspace']}" if p["subspace"] else "")
                     + (f", round_to {p['round_to']} ({p['rounding']})" if p.get("round_to") else ""))
    for row in result["kept"]:
        lines.append(f"kept   {row['name']:48s} ({row['reason']})")
    lines.append(f"{len(result['fused'])} tensors fused, {len(result['kept'])} kept from the fine-tune")
    lines += result["warnings"]
    return "\n".join(lines)

