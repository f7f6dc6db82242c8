"""The points of ``mergekit-lssf tune``, built in memory on one resident fine-tune.

A point is one repair: ``lssf`` (the recipe's own fusion at one strength: ``alpha``,
or ``lam`` for ``fusion: contrastive``), ``interpolation`` (mergekit's ``linear`` at
weight ``l`` on the aligned model) or ``contrastive`` (``fusion: contrastive`` with
the calibration ``tune`` made, at one ``lam``). Each point has a plain mergekit
recipe (``point_recipe``), and the weights it puts in the model are the ones
``mergekit-yaml`` writes for that recipe, bit for bit:

* ``LssfTerms`` walks the recipe's planned tensors once, through mergekit's own
  loader and ``Executor`` (inputs cast as the merge casts them), and keeps each fused
  weight's term as the kernel's factors (``merge_method.term_factors``, bound to the
  fine-tune): computed once, reused for every strength. A point then reloads the
  fine-tune's tensor and calls ``kernel.write_fused`` with the point's parameters,
  the merge's own last step, rounded once to the recipe's ``round_to``, then cast to
  its ``out_dtype`` as mergekit's writer casts.
* ``interpolation_tensors`` runs mergekit's own plan of the point's ``linear``
  recipe, tensor by tensor.

``Resident`` holds the fine-tune (float32, as ``eval`` loads a model) and puts a
point's tensors in it; ``undo`` puts the fine-tune's own tensors back, read again
from its files and cast as the model was loaded (never a subtraction). Nothing is
duplicated beyond one tensor at a time and the terms.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from mergekit.architecture import get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task
from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor, SaveTensor
from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.dtype import align_dtype
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from tqdm import tqdm

from mergekit_lssf.kernel import write_fused
from mergekit_lssf.layout import as_out_in, fuse_oriented, group_layout
from mergekit_lssf.merge_method import checked_inputs, is_fused, term_factors
from mergekit_lssf.parameters import FusionSettings, LSSFConfigError, settings_from
from mergekit_lssf.plan import LSSFPlan
from mergekit_lssf.recipe import forget_loaders

FAMILIES = ("lssf", "interpolation", "contrastive")
#: The largest interpolation weight of the default grid: past half way to the aligned
#: model little of a fine-tune is left.
INTERPOLATION_MAX = 0.5
#: The default ``lam`` grid runs from LAM_MAX (mild) down to LAM_MIN (strong), log-spaced.
LAM_MAX, LAM_MIN = 30.0, 0.3


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
    """``points`` values, from the mildest repair to the strongest: ``alpha`` = i/N;
    ``l`` = INTERPOLATION_MAX * i/N (both to 4 decimals); ``lam`` log-spaced from
    LAM_MAX down to LAM_MIN (3 significant digits)."""
    if parameter == "alpha":
        return [round(i / points, 4) for i in range(1, points + 1)]
    if parameter == "l":
        return [round(INTERPOLATION_MAX * i / points, 4) for i in range(1, points + 1)]
    ratio = LAM_MIN / LAM_MAX
    return [float(f"{LAM_MAX * ratio ** (i / (points - 1)):.3g}") for i in range(points)]


def check_grid_value(parameter: str, value: float, fusion: str) -> str | None:
    """Why ``value`` cannot be a point of ``parameter`` (None: it can)."""
    if parameter == "alpha" and not 0 < value <= (1 if fusion == "restore" else 2):
        return f"alpha must satisfy 0 < alpha <= {1 if fusion == 'restore' else 2} (fusion {fusion})"
    if parameter == "l" and not 0 < value < 1:
        return "l (the weight on the aligned model) must satisfy 0 < l < 1"
    if parameter == "lam" and not value > 0:
        return "lam must be > 0"
    return None


# ---------------------------------------------------------------- recipes


def recipe_doc(path: str, plan: LSSFPlan) -> dict[str, Any]:
    """The lssf recipe at ``path`` as a plain dict, as the user wrote it (mergekit's
    planner rewrites ``plan.config`` in place), with the ``tokenizer_source: base``
    the plan adds for a fine-tune with added tokens."""
    with open(path, encoding="utf-8") as fp:
        doc = yaml.safe_load(fp)
    if plan.config.tokenizer_source == "base" and not (doc.get("tokenizer_source") or doc.get("tokenizer")):
        doc["tokenizer_source"] = "base"
    return doc


def aligned_and_base(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The ``role: aligned`` entry of an lssf recipe dict and its ``base_model``."""
    aligned = [m for m in doc.get("models") or [] if (m.get("parameters") or {}).get("role") == "aligned"]
    if len(aligned) != 1:
        raise LSSFConfigError("tune: the interpolation and contrastive families need a recipe that lists its models "
                              "under `models:` (one with `role: aligned`), not slices or modules")
    return aligned[0], doc["base_model"]


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
        self.changed: set = set()

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
        loaded), so that ``undo`` restores exactly the model that was loaded."""
        for name, load in self.sources.items():
            stored = load.execute()
            if stored is None:
                continue
            param = self.param(name)
            if tuple(param.shape) != tuple(stored.shape) or not torch.equal(
                    param.detach().cpu(), stored.to(param.dtype)):
                raise LSSFConfigError(f"tune: tensor {name} of the loaded fine-tune differs from its checkpoint "
                                      "file; cannot restore it exactly after a point")

    def put(self, name: str, tensor: torch.Tensor) -> None:
        param = self.param(name)
        if tuple(param.shape) != tuple(tensor.shape):
            raise LSSFConfigError(f"tune: a point's tensor {name} has shape {tuple(tensor.shape)}, the fine-tune's "
                                  f"{tuple(param.shape)}")
        self.changed.add(name)
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
        """The fine-tune's own tensors back where a point changed them."""
        for name in sorted(self.changed):
            param = self.param(name)
            with torch.no_grad():
                param.copy_(self.sources[name].execute().to(param.device, param.dtype))
        self.changed.clear()


# ---------------------------------------------------------------- lssf terms


@dataclass
class TensorTerm:
    """One fused weight: the planned load of its fine-tune input (the merge's cast),
    its layout, the merge's work dtype, the dtype mergekit writes (None: as computed),
    and per point its settings and factors (a list per expert for stacked experts)."""

    name: str
    load: LoadTensor
    layout: Any
    dtype: torch.dtype
    written: torch.dtype | None
    settings: tuple[FusionSettings, ...]
    factors: tuple[Any, ...]

    def fused(self, index: int, device: torch.device) -> torch.Tensor:
        """This weight at point ``index``, exactly as the merge writes it."""
        w_ft = self.load.execute().to(device).to(self.dtype)
        settings, factors = self.settings[index], self.factors[index]
        round_to = getattr(torch, settings.round_to) if settings.round_to else None

        def one(w: torch.Tensor, f) -> torch.Tensor:
            return fuse_oriented(self.layout, lambda x: write_fused(
                x, f, settings.alpha, out_dtype=round_to, rounding=settings.rounding)[0], w)

        out = torch.stack([one(w_ft[e], factors[e]) for e in range(w_ft.shape[0])]) if w_ft.ndim == 3 \
            else one(w_ft, factors)
        return out.to(self.written) if self.written is not None else out


class TermTask(Task[TensorTerm | None]):
    """One planned lssf tensor: its inputs as the merge loads them, and its term's
    factors for every point (``overrides``: the parameter values of each point)."""

    source: ExecuteMergeMethodTask
    overrides: tuple[tuple[tuple[str, float], ...], ...]
    written: str | None = None

    def arguments(self):
        return {"tensors": self.source.gather_tensors}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> str | None:
        return self.source.group_label()

    def execute(self, tensors, **_kwargs) -> TensorTerm | None:
        src = self.source
        entries = tuple(TensorEntry(id=m, tensor=tensors[m], is_base=m == src.base_model)
                        for m in src.model_order if m in tensors)
        group = TensorGroup(entries, TensorMetadata.from_weight_info(src.output_weight))
        if group.base is None or not group.base.tensor.is_floating_point():
            return None
        group = align_dtype(group, dtype_from_name(src.dtype))  # as the method receives its inputs
        if not is_fused(group):
            return None
        name = src.output_weight.name
        group.validate_tensors()
        role = {m: p["role"] for m, p in src.input_parameters.items() if "role" in p}
        values = dict(src.parameters.items())
        settings = tuple(settings_from({**values, **dict(o)}, f"tensor {name}") for o in self.overrides)
        finetuned, aligned, unaligned = checked_inputs(group, role, name, settings[0].fusion)
        layout = group_layout(group)
        w_ft, w_al, w_un = (None if x is None else as_out_in(layout, x.tensor) for x in (finetuned, aligned, unaligned))
        cache: dict[Any, Any] = {}

        def factors_of(s: FusionSettings):
            key = s.lam if s.fusion == "contrastive" else None  # restore/add: one term for every alpha
            if key not in cache:
                def one(f, a, u, label):
                    return term_factors(label, f, a, u, s).with_finetune(f)
                cache[key] = ([one(w_ft[e], w_al[e], None if w_un is None else w_un[e], f"{name}[{e}]")
                               for e in range(w_ft.shape[0])] if w_ft.ndim == 3 else one(w_ft, w_al, w_un, name))
            return cache[key]

        factors = tuple(factors_of(s) for s in settings)
        return TensorTerm(name, _base_load(src, cast=True), layout, finetuned.tensor.dtype, dtype_from_name(self.written),
                          settings, factors)


def lssf_terms(plan: LSSFPlan, points: Sequence[Point], device: torch.device, *,
               progress: bool = True) -> list[TensorTerm]:
    """The term of every weight ``plan`` fuses, for ``points`` (one family, one swept
    parameter), computed in one pass over the models; each term stays on ``device``."""
    overrides = tuple(((p.parameter, p.value),) for p in points)
    out_dtype = plan.config.out_dtype
    tasks = [TermTask(source=t, overrides=overrides, written=t.output_weight.force_dtype or out_dtype)
             for t in plan.tensors]
    executor = Executor(targets=tasks, math_device=device, storage_device=torch.device("cpu"))
    terms = []
    for _task, term in tqdm(executor.run(quiet=True), total=len(tasks), desc="lssf terms", unit="tensor",
                            disable=not progress):
        if term is not None:
            terms.append(term)
    return terms


def lssf_tensors(terms: Sequence[TensorTerm], index: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every fused weight at point ``index`` of the terms."""
    for term in terms:
        yield term.name, term.fused(index, device)


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


def plan_merge(config: MergeConfiguration, options: MergeOptions) -> list[WrittenTensor]:
    """mergekit's own plan of ``config`` (any merge method), one task per output tensor
    that returns it as mergekit-yaml writes it."""
    forget_loaders(config)
    LoaderCache().setup(options=options)
    arch_info = get_architecture_info(config, options)
    out_ref = config.base_model or config.models[0].model
    planner = MergePlanner(config, arch_info, options=options,
                           out_model_config=out_ref.config(trust_remote_code=options.trust_remote_code))
    planned = planner.plan_to_disk(out_path=os.devnull)  # as mergekit-yaml plans; its writer never runs
    return [WrittenTensor(name=s.tensor_name, tensor_task=s.tensor_task, dtype=s.dtype)
            for s in planned if isinstance(s, SaveTensor)]


def interpolation_tensors(doc: dict[str, Any], options: MergeOptions,
                          device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every output tensor of the ``linear`` recipe ``doc``,
    computed by mergekit's own graph, one tensor at a time."""
    tasks = plan_merge(MergeConfiguration.model_validate(doc), options)
    executor = Executor(targets=tasks, math_device=device, storage_device=torch.device("cpu"))
    for task, tensor in executor.run(quiet=True):
        if tensor is not None:
            yield task.name, tensor


__all__ = ["FAMILIES", "Point", "Resident", "TensorTerm", "check_grid_value", "contrastive_doc", "default_grid",
           "interpolation_tensors", "lssf_tensors", "lssf_terms", "plan_merge", "point_recipe", "recipe_doc",
           "recipe_text", "swept_parameter"]
