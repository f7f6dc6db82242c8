"""Walk the tensors an lssf recipe would fuse, with mergekit's planner and loader.

``fused_factors`` plans the recipe exactly as ``mergekit-yaml`` does (filters,
gradients, slices, ``model+lora``), then runs one small task per tensor through
mergekit's ``Executor``: tensors are loaded lazily, one at a time, on the GPU when
asked, and only the factors and spectrum of each fused weight come back.
Used by ``mergekit-lssf report`` and ``mergekit-lssf extract-patch``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

import torch
from tqdm import tqdm
from mergekit.graph import Executor, Task
from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions

from mergekit_lssf.kernel import SafetyFactors, safety_factors
from mergekit_lssf.merge_method import checked_inputs, is_fused, load_subspace, term_factors
from mergekit_lssf.layout import as_out_in, group_layout  # [issue 49 finding 7: layout]
from mergekit_lssf.parameters import FusionSettings, settings_from
from mergekit_lssf.plan import LSSFPlan, planned_tensors

LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class FusedTensor:
    """One fused weight: its name, shape, resolved parameters and factors (CPU)."""

    name: str  # ``...experts.down_proj[3]`` for one expert of a stacked expert weight
    shape: tuple
    parameters: dict
    factors: SafetyFactors
    expert: Optional[int] = None  # the expert's index in a stacked expert weight

    @property
    def layer(self) -> Optional[int]:
        match = LAYER.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def module(self) -> str:
        """The weight's module within its layer, e.g. ``self_attn.q_proj``."""
        stem = self.name.removesuffix(".weight")
        match = LAYER.search(stem + ".")
        return stem[match.end():] if match else stem


class FactorTask(Task[Optional[List[FusedTensor]]]):
    """Load one tensor group (lazily, via mergekit) and compute its lssf factors."""

    source: ExecuteMergeMethodTask
    factors: bool = True  # False: spectrum and rank only (FusedTensor.factors has no left/right)

    def arguments(self):
        return {"tensors": self.source.gather_tensors}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> Optional[str]:
        return self.source.group_label()

    def execute(self, tensors, **_kwargs) -> Optional[List[FusedTensor]]:
        src = self.source
        entries = tuple(
            TensorEntry(id=m, tensor=tensors[m], is_base=m == src.base_model)
            for m in src.model_order
            if m in tensors
        )
        group = TensorGroup(entries, TensorMetadata.from_weight_info(src.output_weight))
        if group.base is None or not is_fused(group):
            return None
        name = src.output_weight.name
        group.validate_tensors()
        role = {m: p["role"] for m, p in src.input_parameters.items() if "role" in p}
        params = settings_from(dict(src.parameters.items()), f"tensor {name}")
        finetuned, aligned, unaligned = checked_inputs(group, role, name, params.fusion)
        # [issue 49 finding 7: layout] Conv1D (d_in x d_out) weights as d_out x d_in, as the merge fuses them
        layout = group_layout(group)
        w_ft, w_al, w_un = (None if x is None else as_out_in(layout, x.tensor) for x in (finetuned, aligned, unaligned))
        if w_ft.ndim == 3:  # stacked MoE experts, one weight per expert
            return [_factors(f"{name}[{e}]", w_ft[e], w_al[e], None if w_un is None else w_un[e], params,
                             self.factors, e) for e in range(w_ft.shape[0])]
        return [_factors(name, w_ft, w_al, w_un, params, self.factors)]


def _factors(name: str, w_ft: torch.Tensor, w_al: torch.Tensor, w_un: Optional[torch.Tensor],
             settings: FusionSettings, with_factors: bool, expert: Optional[int] = None) -> FusedTensor:
    if settings.fusion == "contrastive":  # the factors are the cheap part: no spectrum to skip
        factors = term_factors(name, w_ft, w_al, w_un, settings)
    else:
        factors = safety_factors(w_al, w_un, settings, subspace=load_subspace(settings.subspace, name, w_al),
                                 factors=with_factors)
    factors = factors.with_finetune(w_ft)  # restore: the term for this fine-tune
    cpu = lambda t: None if t is None else t.detach().to("cpu", torch.float32)  # noqa: E731
    factors = SafetyFactors(cpu(factors.left), cpu(factors.right), factors.info, factors.sigma.cpu(),
                            factors.fusion, side=factors.side)
    return FusedTensor(name, tuple(w_ft.shape), asdict(settings), factors, expert)


def fused_factors(plan: LSSFPlan, *, cuda: bool = False, quiet: bool = False,
                  factors: bool = True) -> Iterator[FusedTensor]:
    """Yield a FusedTensor for every weight the planned recipe fuses, in model order
    (``factors=False``: spectra and ranks only, without computing the factors);
    ``model+lora`` inputs are merged in the plan's ``lora_merge_cache``."""
    options = MergeOptions(cuda=cuda, quiet=quiet, lora_merge_cache=plan.lora_merge_cache)
    tasks = [FactorTask(source=t, factors=factors) for t in planned_tensors(plan.config, options)]
    device = torch.device(options.device)
    executor = Executor(targets=tasks, math_device=device, storage_device=torch.device("cpu"))
    # one step per output tensor (mergekit's own bar would count every load task too)
    results = executor.run(quiet=True)
    for _task, result in tqdm(results, total=len(tasks), desc="lssf tensors", unit="tensor", disable=quiet):
        yield from result or []


__all__ = ["FusedTensor", "FactorTask", "fused_factors", "planned_tensors"]
