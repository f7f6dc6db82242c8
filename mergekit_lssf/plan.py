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

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.provenance import effective_parameters
from mergekit_lssf.recipe import (
    check_lora_merge_cache,
    check_recipe,
    dtype_warning,
    role_check,
    rounding_problems,
    scope_warnings,
    with_tokenizer_source,
)


@dataclass(frozen=True)
class LSSFPlan:
    """A checked lssf recipe.

    config: the recipe as mergekit runs it (``tokenizer_source: base`` added when the
    vocabularies differ); refs: ``{"aligned": ref, "unaligned": ref}``;
    written_dtype: the dtype the output is written in (``out_dtype``, else ``dtype``;
    None: the inputs'); warnings: one line each, printed by the command;
    lora_merge_cache: mergekit's folder for merged ``model+lora`` inputs (None: none).
    """

    config: MergeConfiguration
    refs: Dict[str, ModelReference]
    written_dtype: Optional[str]
    warnings: Tuple[str, ...]
    lora_merge_cache: Optional[str] = None

    def __post_init__(self) -> None:
        """Nothing to do; a test counts the plans a command builds through this."""

    @property
    def finetuned(self) -> ModelReference:
        return self.config.base_model

    @property
    def aligned(self) -> ModelReference:
        return self.refs["aligned"]

    @property
    def unaligned(self) -> ModelReference:
        return self.refs["unaligned"]

    def parameters(self) -> Dict[str, Any]:
        """The recipe-level parameters with every default filled in."""
        return effective_parameters(self.config)


def plan_recipe(
    config: MergeConfiguration, *, trust_remote_code: bool = False, lora_merge_cache: Optional[str] = None,
    needs_weights: bool = True,
) -> LSSFPlan:
    """Check ``config`` (an lssf recipe) and resolve it; ``LSSFConfigError`` names the
    field at fault. ``needs_weights``: the command loads weights, so a ``model+lora``
    input needs ``lora_merge_cache`` (``check`` reads headers only and passes False)."""
    if config.merge_method != "lssf":
        raise LSSFConfigError(f"merge_method is {config.merge_method!r}, not 'lssf'")
    refs = check_recipe(config, trust_remote_code=trust_remote_code)
    if needs_weights:
        check_lora_merge_cache(config, lora_merge_cache)
    written = str(config.out_dtype or config.dtype or "") or None
    errors, rounding_warnings = rounding_problems(config, written)
    if errors:
        raise LSSFConfigError(errors[0])
    warnings = [w for w in (role_check(config, refs), dtype_warning(config, refs)) if w]
    warnings += scope_warnings(config) + rounding_warnings
    return LSSFPlan(with_tokenizer_source(config, refs), refs, written, tuple(warnings), lora_merge_cache)
