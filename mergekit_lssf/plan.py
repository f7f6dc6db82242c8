"""One lssf recipe, parsed and checked once, into the plan every command reads.

``plan_recipe`` runs the whole pre-flight check of a ``merge_method: lssf`` recipe
(``recipe.check_recipe``: fields, values, roles, shapes, subspace files; the rules
between parameters; ``round_to`` against the written dtype; a ``model+lora`` input
without a merge cache) and resolves what the merge will use: the models by role,
the recipe as mergekit will run it, the dtype written, and the warnings. The
``mergekit-yaml`` / ``mergekit-multi`` hook, ``check``, ``report`` and
``extract-patch`` each build exactly one plan per recipe and pass it on.

The merge method never reads a plan: its parameters are declared once
(``parameters.PARAMETERS``) and it applies the same rules itself, so that
``merge_state_dicts`` refuses what ``mergekit-yaml`` refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from mergekit_lssf.parameters import PER_MODEL_PARAMETERS, LSSFConfigError, combination_problems, settings_from
from mergekit_lssf.provenance import effective_parameters
from mergekit_lssf.recipe import (
    check_lora_merge_cache,
    check_recipe,
    dtype_name,
    dtype_warning,
    forget_loaders,
    role_check,
    rounding_problems,
    with_tokenizer_source,
)


def planned_tensors(config: MergeConfiguration, options: MergeOptions, *, saves: bool = False) -> list:
    """mergekit's merge task of every output tensor, planned exactly as mergekit-yaml
    plans it (filters and gradients resolved per tensor); nothing is loaded. Any merge
    method (``tune`` plans ``linear`` recipes with it too). ``saves``: mergekit's
    ``SaveTensor`` of each instead (``tensor_name``, ``tensor_task`` and ``dtype``,
    the dtype the writer casts it to)."""
    forget_loaders(config)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_ref = config.base_model or config.referenced_models()[0]  # as mergekit's _model_out_config
    out_config = out_ref.config(trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # plan_in_memory() fails to validate in mergekit 0.1.5 with current pydantic;
    # plan_to_disk() is what mergekit-yaml runs. Its writer tasks are never executed.
    planned = [t for t in planner.plan_to_disk(out_path=os.devnull) if isinstance(t, SaveTensor)]
    return planned if saves else [t.tensor_task for t in planned]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def tensor_parameters(task) -> Dict[str, Any]:
    """The recipe-level parameters mergekit resolved for one planned tensor."""
    return {k: _plain(v) for k, v in task.parameters.items() if k not in PER_MODEL_PARAMETERS}


@dataclass(frozen=True)
class LSSFPlan:
    """A checked lssf recipe.

    config: the recipe as mergekit runs it (``tokenizer_source: base`` added when the
    vocabularies differ); refs: ``{"aligned": ref, "unaligned": ref}``;
    written_dtype: the dtype the output is written in (``out_dtype``, else ``dtype``;
    None: the inputs'); warnings: one line each, printed by the command;
    lora_merge_cache: mergekit's folder for merged ``model+lora`` inputs (None: none);
    tensors: mergekit's planned task of every output tensor, its parameters checked
    by the rules the merge method applies (empty when planned with ``tensors=False``).
    """

    config: MergeConfiguration
    refs: Dict[str, ModelReference]
    written_dtype: Optional[str]
    warnings: Tuple[str, ...]
    lora_merge_cache: Optional[str] = None
    tensors: Tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        """Nothing to do; a test counts the plans a command builds through this."""

    @property
    def aligned(self) -> ModelReference:
        return self.refs["aligned"]

    def parameters(self) -> Dict[str, Any]:
        """The recipe-level parameters with every default filled in."""
        return effective_parameters(self.config)


def plan_recipe(
    config: MergeConfiguration, *, trust_remote_code: bool = False, lora_merge_cache: Optional[str] = None,
    needs_weights: bool = True, tensors: bool = True, options: Optional[MergeOptions] = None,
) -> LSSFPlan:
    """Check ``config`` (an lssf recipe) and resolve it; ``LSSFConfigError`` names the
    field or tensor at fault. ``needs_weights``: the command loads weights, so a
    ``model+lora`` input needs ``lora_merge_cache`` (``check`` reads headers only and
    passes False). ``tensors``: plan every output tensor with mergekit's planner (file
    headers only) and apply the method's rules to each tensor's resolved parameters,
    so that a recipe the merge would refuse at some tensor is refused before anything
    is written; False for a ``mergekit-multi`` document whose inputs do not exist yet.
    ``options``: the merge's own options, when a merge plans (the tensors are planned
    with them, quietly)."""
    if config.merge_method != "lssf":
        raise LSSFConfigError(f"merge_method is {config.merge_method!r}, not 'lssf'")
    refs = check_recipe(config, trust_remote_code=trust_remote_code)
    if needs_weights:
        check_lora_merge_cache(config, lora_merge_cache)
    written = dtype_name(config.out_dtype or config.dtype)
    errors, rounding_warnings = rounding_problems(config, written)
    if errors:
        raise LSSFConfigError(errors[0])
    warnings = [w for w in (role_check(config, refs), dtype_warning(config, refs)) if w]
    config, vocabulary_warning = with_tokenizer_source(config, refs)
    planned: List[Any] = []
    if tensors:
        options = (options.model_copy(update={"quiet": True}) if options is not None else
                   MergeOptions(quiet=True, lora_merge_cache=lora_merge_cache, trust_remote_code=trust_remote_code))
        planned = planned_tensors(config, options)
        warnings += _tensor_warnings(planned)
    warnings += rounding_warnings + ([vocabulary_warning] if vocabulary_warning else [])
    return LSSFPlan(config, refs, written, tuple(warnings), lora_merge_cache, tuple(planned))


def _tensor_warnings(planned: List[Any]) -> List[str]:
    """Every tensor's resolved parameters through the method's own rules
    (``settings_from``: the first tensor that breaks one is an error, as it would be
    in the merge); the distinct warnings, each once, naming the first tensor."""
    seen: Dict[str, str] = {}
    for task in planned:
        name = task.output_weight.name
        values = tensor_parameters(task)
        settings_from(values, f"tensor {name}")
        for warning in combination_problems(values)[1]:
            seen.setdefault(warning, name)
    return [f"{warning} (first at tensor {name})" for warning, name in seen.items()]
