"""The points of ``mergekit-lssf tune``, built in memory on one resident fine-tune.

Each point has a plain mergekit recipe (``tune_recipes.point_recipe``), and the weights
it puts in the model are the ones ``mergekit-yaml`` writes for that recipe, bit for
bit. Terms and points are computed on the CPU, as plain ``mergekit-yaml`` (without
``--cuda``) computes them, whatever ``--device`` says (it places the resident model):

* ``lssf_terms`` walks the recipe's planned tensors once, through mergekit's own
  loader and ``Executor`` (inputs cast as the merge casts them), and keeps each fused
  weight's term as the kernel's factors (``merge_method.fused_terms``, the merge's own
  checks and factors): computed once, reused for every strength. A point then reloads
  the fine-tune's tensor and calls ``merge_method.write_terms`` with the point's
  parameters (the merge's own last step, rounded once to the recipe's ``round_to``),
  then casts to the dtype mergekit's writer casts to. A tensor lssf does not fuse is
  the fine-tune's, cast as the writer casts it: it is put in the model when that cast
  changes it (a float32 fine-tune written in bfloat16).
* ``interpolation_tensors`` runs mergekit's own plan of the point's ``linear``
  recipe (``plan.planned_tensors``), tensor by tensor.

``Resident`` holds the fine-tune (float32, as ``eval`` loads a model) and puts a
point's tensors in it, keeping a CPU copy of each original tensor it replaces (in
the checkpoint's dtype, which holds it exactly); ``undo`` copies them back (never a
subtraction, nothing read again). Nothing is duplicated beyond those copies, one
tensor at a time, and the terms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task
from mergekit.io.tasks import GatherTensors, LoadTensor
from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.dtype import align_dtype
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from tqdm import tqdm

from mergekit_lssf.merge_method import GroupTerms, fused_terms, write_terms
from mergekit_lssf.parameters import FusionSettings, LSSFConfigError, settings_from
from mergekit_lssf.plan import planned_tensors
from mergekit_lssf.tune_recipes import Point

#: Where terms and points are computed: plain mergekit-yaml's math device.
CPU = torch.device("cpu")


# ---------------------------------------------------------------- the resident fine-tune


def _base_load(src: ExecuteMergeMethodTask, cast: bool = False) -> LoadTensor:
    """mergekit's load of the fine-tune's tensor for one planned task: with ``cast``,
    cast as the merge casts its inputs (the recipe's ``dtype``), else as stored."""
    gather = src.gather_tensors
    while not isinstance(gather, GatherTensors):  # PermutedVocabulary and the like wrap it
        gather = gather.gather_tensors
    info = gather.weight_info[src.base_model]
    return LoadTensor(model=src.base_model, tensor=info.name, dtype=(info.force_dtype or gather.dtype) if cast else None,
                      optional=info.optional, aliases=info.aliases, tied_names=info.tied_names)


class Resident:
    """The fine-tune, loaded once (``model``), that points are put into and taken out
    of. ``tasks``: mergekit's planned task of every output tensor of the recipe."""

    def __init__(self, model, tasks: Sequence[ExecuteMergeMethodTask]):
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.sources = {t.output_weight.name: _base_load(t) for t in tasks}
        self.stored: dict[str, torch.dtype] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def param(self, name: str) -> torch.Tensor:
        """The model's tensor of the checkpoint tensor ``name`` (exact name, else the one
        name that ends with it)."""
        if name in self.state:
            return self.state[name]
        found = [k for k in self.state if k.endswith("." + name)]
        if len(found) != 1:
            raise LSSFConfigError(f"tune: the loaded fine-tune has no tensor {name} (found {found or 'none'}); "
                                  "cannot put a point's weights in it")
        return self.state[found[0]]

    def check(self) -> None:
        """Every planned tensor of the loaded model holds the checkpoint's values (cast as
        loaded), so that the copy ``put`` keeps, in the checkpoint's dtype, is exact."""
        for name, load in self.sources.items():
            stored = load.execute()
            if stored is None:
                continue
            param = self.param(name)
            if tuple(param.shape) != tuple(stored.shape) or not torch.equal(
                    param.detach().cpu(), stored.to(param.dtype)):
                raise LSSFConfigError(f"tune: tensor {name} of the loaded fine-tune differs from its checkpoint "
                                      "file; cannot restore it exactly after a point")
            self.stored[name] = stored.dtype

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """``tensor`` in the model's ``name``, its original kept first (on the CPU)."""
        param = self.param(name)
        if tuple(param.shape) != tuple(tensor.shape):
            raise LSSFConfigError(f"tune: a point's tensor {name} has shape {tuple(tensor.shape)}, the fine-tune's "
                                  f"{tuple(param.shape)}")
        if name not in self.originals:
            self.originals[name] = param.detach().to("cpu", self.stored.get(name, param.dtype), copy=True)
        with torch.no_grad():
            param.copy_(tensor.to(param.device, param.dtype))

    def apply(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Put every ``(name, tensor)`` in the model; the count."""
        count = 0
        for name, tensor in tensors:
            self.put(name, tensor)
            count += 1
        return count

    def undo(self) -> None:
        """The fine-tune's own tensors back where a point changed them, from the copies."""
        for name in sorted(self.originals):
            param = self.param(name)
            with torch.no_grad():
                param.copy_(self.originals[name].to(param.device, param.dtype))
        self.originals.clear()


# ---------------------------------------------------------------- lssf terms


@dataclass
class TensorTerm:
    """One planned tensor that a point changes: the planned load of its fine-tune input
    (the merge's cast), the dtype the merge computes in, the dtype mergekit writes
    (None: as computed), and per point its settings and its terms (``GroupTerms``).
    A tensor lssf does not fuse has no terms: ``kept`` is the fine-tune's tensor as
    the merge writes it (cast), the same at every point."""

    name: str
    load: LoadTensor | None
    dtype: torch.dtype
    written: torch.dtype | None
    settings: tuple[FusionSettings, ...] = ()
    terms: tuple[GroupTerms, ...] = ()
    kept: torch.Tensor | None = None

    def value(self, index: int) -> torch.Tensor:
        """This tensor at point ``index``, exactly as the merge writes it."""
        if self.kept is not None:
            return self.kept
        w_ft = self.load.execute().to(CPU).to(self.dtype)
        out = write_terms(self.terms[index], w_ft, self.settings[index])
        return out.to(self.written) if self.written is not None else out


class TermTask(Task[TensorTerm | None]):
    """One planned lssf tensor: its inputs as the merge loads them, and its terms for
    every point (``overrides``: the parameter values of each point); None when no point
    changes it."""

    source: ExecuteMergeMethodTask
    overrides: tuple[tuple[tuple[str, float], ...], ...]
    written: str | None = None

    def arguments(self):
        return {"tensors": self.source.gather_tensors}

    def group_label(self) -> str | None:
        return self.source.group_label()

    def execute(self, tensors, **_kwargs) -> TensorTerm | None:
        src = self.source
        entries = tuple(TensorEntry(id=m, tensor=tensors[m], is_base=m == src.base_model)
                        for m in src.model_order if tensors.get(m) is not None)
        group = TensorGroup(entries, TensorMetadata.from_weight_info(src.output_weight))
        if group.base is None or not group.base.tensor.is_floating_point():
            return None  # mergekit passes buffers through unchanged
        group.validate_tensors()
        group = align_dtype(group, dtype_from_name(src.dtype))  # as the method receives its inputs
        name, written = src.output_weight.name, dtype_from_name(self.written)
        role = {m: p["role"] for m, p in src.input_parameters.items() if "role" in p}
        values = dict(src.parameters.items())
        points = [{**values, **dict(o)} for o in self.overrides]
        cache: dict[Any, GroupTerms | None] = {}
        for v in points:  # restore/add: one term for every alpha; contrastive: one per lam
            key = v.get("lam") if v.get("fusion") == "contrastive" else None
            if key not in cache:
                cache[key] = fused_terms(group, role, v)
        terms = [cache[v.get("lam") if v.get("fusion") == "contrastive" else None] for v in points]
        dtype = group.base.tensor.dtype
        if terms[0] is None:  # kept from the fine-tune: changed only by the merge's casts
            kept = group.base.tensor.to(written) if written is not None else group.base.tensor
            stored = _base_load(src).execute()
            if torch.equal(kept.to(torch.float32), stored.to(torch.float32)):  # as eval loads either
                return None
            return TensorTerm(name, None, dtype, written, kept=kept.to(CPU))
        # each point's own settings (its alpha): a cached term carries the first point's
        settings = tuple(settings_from(v, f"tensor {name}") for v in points)
        return TensorTerm(name, _base_load(src, cast=True), dtype, written, settings, tuple(terms))


def lssf_terms(config: MergeConfiguration, options: MergeOptions, points: Sequence[Point], *,
               progress: bool = True) -> list[TensorTerm]:
    """The terms of every tensor the lssf recipe ``config`` changes, for ``points`` (one
    family, one swept parameter), computed on the CPU in one pass over the models."""
    overrides = tuple(((p.parameter, p.value),) for p in points)
    tasks = [TermTask(source=s.tensor_task, overrides=overrides, written=s.dtype)
             for s in planned_tensors(config, options, saves=True)]
    executor = Executor(targets=tasks, math_device=CPU, storage_device=CPU)
    terms = []
    for _task, term in tqdm(executor.run(quiet=True), total=len(tasks), desc="lssf terms", unit="tensor",
                            disable=not progress):
        if term is not None:
            terms.append(term)
    return terms


def lssf_tensors(terms: Sequence[TensorTerm], index: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor the point ``index`` of the terms changes."""
    for term in terms:
        yield term.name, term.value(index)


# ---------------------------------------------------------------- interpolation


class WrittenTensor(Task[Any]):
    """One planned output tensor, cast as mergekit's writer casts it (``SaveTensor``)."""

    name: str
    tensor_task: Task
    dtype: str | None = None

    def arguments(self):
        return {"tensor": self.tensor_task}

    def group_label(self) -> str | None:
        return self.tensor_task.group_label()

    def execute(self, tensor, **_kwargs):
        if tensor is not None and self.dtype:
            tensor = tensor.to(dtype=dtype_from_name(self.dtype))
        return tensor


def interpolation_tensors(doc: dict[str, Any], options: MergeOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every output tensor of the ``linear`` recipe ``doc``,
    computed on the CPU by mergekit's own graph, one tensor at a time."""
    saves = planned_tensors(MergeConfiguration.model_validate(doc), options, saves=True)
    tasks = [WrittenTensor(name=s.tensor_name, tensor_task=s.tensor_task, dtype=s.dtype) for s in saves]
    executor = Executor(targets=tasks, math_device=CPU, storage_device=CPU)
    for task, tensor in executor.run(quiet=True):
        if tensor is not None:
            yield task.name, tensor


__all__ = ["CPU", "Resident", "TensorTerm", "interpolation_tensors", "lssf_tensors", "lssf_terms"]
