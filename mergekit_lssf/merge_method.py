"""The ``lssf`` merge method: mergekit 0.1.5 glue around the kernel (``kernel.py``).

One call merges one output tensor. The fine-tuned model is mergekit's base input;
the two other inputs carry ``role: aligned`` and ``role: unaligned``. The linear
weights ``fused.kept_reason`` accepts are fused (stacked MoE experts one expert at a
time); every other tensor is the fine-tuned model's, unchanged.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional, Sequence

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_lssf.fused import fuses
from mergekit_lssf.layout import as_out_in, fuse_oriented, group_layout  # [issue 49 finding 7: layout]
from mergekit_lssf.contrastive_file import open_contrastive
from mergekit_lssf.kernel import SafetyFactors, contrastive_safety_factors, safety_factors, write_fused
from mergekit_lssf.precision import SIXTEEN_BIT
from mergekit_lssf.parameters import (
    PARAMETERS,
    FusionSettings,
    LSSFConfigError,
    one_per_role,
    required_roles,
    settings_from,
)
from mergekit_lssf.stats import STATS, TensorRecord
from mergekit_lssf.subspace_file import open_subspace

LOG = logging.getLogger("mergekit_lssf")

#: GPT-2's Conv1D projections (stored d_in x d_out): without a config to read the
#: layout from, fusing them by name would project on the wrong side, so it is refused.
CONV1D_NAME = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")


def is_fused(group: TensorGroup) -> bool:
    """True for the weights LSSF fuses (``fused.kept_reason``); False for the rest."""
    tensor = group.base.tensor
    return fuses(group.metadata.name, tuple(tensor.shape), tensor.is_floating_point(),
                 group.metadata.vocabulary_axis, layout=group_layout(group))  # [issue 49 finding 7: layout]


def _inputs_by_role(group: TensorGroup, role: Dict[Hashable, str], name: str, fusion: str):
    entries = {entry.id: entry for entry in group.non_base}
    picked = one_per_role({i: role[i] for i in entries}, f"tensor {name} has", required_roles([fusion]))
    return entries[picked["aligned"]], entries.get(picked["unaligned"])


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or Inf values ``tensor`` holds (0 for non-float tensors).

    ``torch.aminmax`` propagates NaN and returns +-Inf when present, and reads the
    tensor once without a temporary (about 15x faster than ``isfinite(t).all()`` on
    the CPU); only a tensor that fails it is counted element by element.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _check_finite(entries: Sequence[Any], labels: Sequence[str], name: str) -> None:
    for entry, label in zip(entries, labels):
        tensor = entry.tensor
        bad = count_non_finite(tensor)
        if bad:
            raise LSSFConfigError(
                f"lssf: tensor {name} of the {label} model ({entry.id}) has {bad} "
                f"non-finite values (NaN or Inf) out of {tensor.numel()}; "
                "refusing to write a merged model from it"
            )


def checked_inputs(group: TensorGroup, role: Dict[Hashable, str], name: str, fusion: str = "restore"):
    """The (fine-tuned, aligned, unaligned) entries, after the role and NaN/Inf checks;
    unaligned is None for ``fusion: contrastive`` without an unaligned model."""
    aligned, unaligned = _inputs_by_role(group, role, name, fusion)
    present = [(e, label) for e, label in ((group.base, "fine-tuned"), (aligned, "aligned"), (unaligned, "unaligned"))
               if e is not None]
    _check_finite([e for e, _ in present], [label for _, label in present], name)
    return group.base, aligned, unaligned


@dataclass(frozen=True)
class GroupTerms:
    """The fused term of one tensor group, as the kernel's factors bound to the
    fine-tune (``SafetyFactors.with_finetune``): ``factors`` is one ``SafetyFactors``,
    or a list per expert for stacked MoE experts; ``layout`` says how the weight is
    stored (``fuse_oriented``); ``settings``: what the factors were computed with."""

    name: str
    layout: Any
    settings: FusionSettings
    factors: Any


def fused_terms(group: TensorGroup, role: Any, values: Dict[str, Any]) -> Optional[GroupTerms]:
    """The per-group work of the merge up to the term, in the merge's order: the rules
    between parameters (``settings_from``), the role and NaN/Inf checks, whether the
    weight is fused (None: the fine-tune's tensor is kept), the refusal of a Conv1D
    weight without a layout, and the term's factors of each 2-D weight (each expert
    of stacked experts) in ``d_out x d_in`` orientation. ``lssf_kernel`` and ``tune``
    both call it; ``write_terms`` is the step after it."""
    name = group.metadata.name or "<unnamed tensor>"
    settings = settings_from(values, f"tensor {name}")
    finetuned, aligned, unaligned = checked_inputs(group, role, name, settings.fusion)
    if not is_fused(group):
        return None
    # [issue 49 finding 7: layout] a Conv1D weight (d_in x d_out) is fused as its transpose
    layout = group_layout(group)
    if layout is None and CONV1D_NAME.search(name):
        raise LSSFConfigError(
            f"tensor {name}: a GPT-2-style Conv1D weight (stored d_in x d_out), and no model config says how it is "
            "stored (an in-memory merge); merge the model folders with mergekit-yaml, whose inputs have a config")
    w_ft, w_al = as_out_in(layout, finetuned.tensor), as_out_in(layout, aligned.tensor)
    w_un = as_out_in(layout, unaligned.tensor) if unaligned is not None else None

    def one(label: str, f: torch.Tensor, a: torch.Tensor, u: Optional[torch.Tensor]) -> SafetyFactors:
        try:
            return term_factors(label, f, a, u, settings).with_finetune(f)
        except RuntimeError as error:  # e.g. an eigensolver that did not converge
            raise RuntimeError(f"lssf: computing tensor {label} {tuple(f.shape)} failed: {error}") from error

    if w_ft.ndim == 3:  # stacked MoE experts (experts, d_out, d_in): each expert is one weight
        factors: Any = [one(f"{name}[{e}]", w_ft[e], w_al[e], None if w_un is None else w_un[e])
                        for e in range(w_ft.shape[0])]
    else:
        factors = one(name, w_ft, w_al, w_un)
    return GroupTerms(name, layout, settings, factors)


def write_terms(terms: GroupTerms, w_ft: torch.Tensor, settings: Optional[FusionSettings] = None, *,
                record: bool = False) -> torch.Tensor:
    """``W_ft + alpha * term`` of every 2-D weight of ``terms``, rounded once to
    ``round_to`` (``kernel.write_fused``), in ``w_ft``'s stored layout: the merge's
    last step. ``settings``: the alpha and rounding to write with (default: those the
    terms were computed with; ``tune`` writes one term at several alphas).
    ``record``: add each weight to ``STATS`` and the log (the merge)."""
    settings = settings or terms.settings
    round_to = getattr(torch, settings.round_to) if settings.round_to else None

    def one(label: str, factors: SafetyFactors, w: torch.Tensor) -> torch.Tensor:
        try:
            fused, written = write_fused(w, factors, settings.alpha, out_dtype=round_to, rounding=settings.rounding)
            if record:
                _record(label, w, factors, written, round_to, settings)
        except RuntimeError as error:
            raise RuntimeError(f"lssf: computing tensor {label} {tuple(w.shape)} failed: {error}") from error
        return fused

    if w_ft.ndim == 3:
        return torch.stack([fuse_oriented(terms.layout, lambda w, e=e: one(f"{terms.name}[{e}]", terms.factors[e], w),
                                          w_ft[e]) for e in range(w_ft.shape[0])])
    return fuse_oriented(terms.layout, lambda w: one(terms.name, terms.factors, w), w_ft)


def lssf_kernel(group: TensorGroup, /, *, role: PerInputValues, **values: Any) -> torch.Tensor:
    """One output tensor of an lssf merge: a function of the three inputs and the
    parameters only (``values``: the shared parameters of ``PARAMETERS``, already
    validated one by one by mergekit; the rules between them are applied here, so
    every entry point refuses what ``mergekit-yaml`` refuses)."""
    terms = fused_terms(group, role, values)
    if terms is None:
        STATS.add_passthrough()
        return group.base.tensor
    return write_terms(terms, group.base.tensor, record=True)


def _record(name: str, w_ft: torch.Tensor, factors: SafetyFactors, written, round_to: Optional[torch.dtype],
            settings: FusionSettings) -> None:
    """One fused 2-D weight (``d_out x d_in``) recorded in STATS (for the summary only:
    nothing read from it decides the result) and logged."""
    written_dtype = round_to or w_ft.dtype
    if round_to is None and STATS.output_dtype in SIXTEEN_BIT:  # for the summary only: what the writer's cast keeps
        _cast, written = write_fused(w_ft, factors, settings.alpha, out_dtype=STATS.output_dtype, rounding="nearest")
        written_dtype = STATS.output_dtype
    info = factors.info
    choice = info.choice
    contrastive = settings.fusion == "contrastive"
    ratio = info.term_ratio(settings.alpha)  # contrastive: ||alpha term|| / ||W_al - W_ft||, from the kernel
    STATS.add(
        TensorRecord(
            name,
            choice.rank,
            choice.capped,
            choice.entropy_share,
            info.spectral_seconds,
            rounding_edge=choice.rounding_edge,
            signal_rank=choice.signal_rank,
            kept=written.kept,
            fusion=settings.fusion,
            term_ratio=ratio,
            wanted_rank=choice.entropy_rank if contrastive else None,
            site=open_contrastive(settings.calibration).site(name) if contrastive else None,
        )
    )
    if contrastive:
        LOG.info("lssf %s %s: fusion contrastive, k %d%s, lam %g; ||term|| %.4g = %.3g x ||W_al - W_ft||%s", name,
                 tuple(w_ft.shape), choice.rank, _contrastive_rank_words(choice, settings.eta), settings.lam,
                 abs(settings.alpha) * info.term_norm, ratio,
                 _written_words(written, written_dtype) if choice.rank else "")
        return
    LOG.info(
        "lssf %s %s: rank %d by %s%s, entropy share %.3f, energy share %.3f; fusion %s%s%s",
        name,
        tuple(w_ft.shape),
        choice.rank,
        _rule_words(choice, settings.eta),
        f" (capped by max_rank from {_uncapped(choice)})" if choice.capped else "",
        choice.entropy_share,
        choice.energy_share,
        settings.fusion,
        _edge_words(choice),
        _written_words(written, written_dtype) if choice.rank else "",
    )


def term_factors(name: str, w_ft: torch.Tensor, w_al: torch.Tensor, w_un: Optional[torch.Tensor],
                 settings: FusionSettings) -> SafetyFactors:
    """The fused term of one 2-D weight (``d_out x d_in``) as factors: from the
    calibration file for ``contrastive``, from the safety subspace otherwise
    (``restore`` factors still need ``with_finetune``)."""
    if settings.fusion == "contrastive":
        basis = open_contrastive(settings.calibration).basis(name, w_ft.shape[1], w_ft.device)
        try:
            return contrastive_safety_factors(w_ft, w_al, basis, lam=settings.lam, rank=settings.rank,
                                              rank_rule=settings.rank_rule, eta=settings.eta, work_dtype=w_ft.dtype)
        except ValueError as error:
            which = "rank" if settings.rank is not None else "rank_rule"
            raise LSSFConfigError(f"tensor {name}: lssf parameter `{which}`: {error} ({settings.calibration})") from None
    return safety_factors(w_al, w_un, settings, subspace=load_subspace(settings.subspace, name, w_ft),
                          work_dtype=w_ft.dtype)


def _contrastive_rank_words(choice, eta: float) -> str:
    """How a contrastive ``k`` was chosen, for the per-tensor log (empty: every stored vector)."""
    if choice.rule == "fixed":
        return " (the fixed `rank`)"
    if choice.rule != "entropy":
        return " (every stored vector)"
    capped = f", capped at the stored count from {choice.entropy_rank}" if choice.capped else ""
    return f" (entropy rule over mu, eta {eta:g}{capped}; {choice.energy_share:.3f} of sum(mu) kept)"


def _edge_words(choice) -> str:
    """The rounding edge and signal rank of 16-bit inputs, for the per-tensor log."""
    if choice.rounding_edge is None:
        return ""
    return f"; rounding edge {choice.rounding_edge:.3g}, signal rank {choice.signal_rank}"


def _written_words(written, dtype: torch.dtype) -> str:
    """What the output cast left of the term, for the per-tensor log."""
    if written.rounding is None and written.kept == 1.0:
        return ""
    how = "subspace-preserving rounding" if written.rounding is not None else (
        "round to nearest (it kept the term: no feedback needed)" if written.plain_kept is not None else "round to nearest")
    steps = f", {written.rounding.iterations} feedback steps" if written.rounding is not None else ""
    return f"; written in {str(dtype).removeprefix('torch.')} by {how}{steps}: {written.kept:.3f} of the term kept"


def _rule_words(choice, eta: float) -> str:
    """How the rank was chosen, for the per-tensor log."""
    if choice.rule == "fixed":
        return "the fixed `rank`"
    if choice.rule == "noise_floor":
        return f"the noise floor (tau {choice.tau:.3g}; eta {eta:g} not used by this rule)"
    return f"the entropy rule (eta {eta:g})"


def _uncapped(choice) -> int:
    return choice.noise_floor_rank if choice.rule == "noise_floor" else choice.entropy_rank


def load_subspace(path: Optional[str], name: str, weight: torch.Tensor):
    """The calibrated subspace of weight ``name`` from file ``path`` (None: data-free)."""
    if path is None:
        return None
    return open_subspace(path).subspace(name, tuple(weight.shape), weight.device)


class LSSFMergeMethod(FunctionalGroupMergeMethod):
    """mergekit's functional method, with input-contract errors in recipe terms."""

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        if base_id is None or base_id not in input_ids:
            raise LSSFConfigError(
                "lssf requires the recipe field `base_model`: the fine-tuned model "
                f"to repair (while planning {group_name or 'the merge'})"
            )
        non_base = [i for i in input_ids if i != base_id]
        if len(non_base) not in (1, 2):
            raise LSSFConfigError(
                "lssf merges one or two models besides `base_model`: one with `role: aligned` and, for "
                "`fusion: restore` or `add`, one with `role: unaligned`; got "
                f"{len(non_base)}: {[str(i) for i in non_base]}"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
        """The in-memory entry point (``merge_state_dicts``, ``merge_tensors``), which
        mergekit tells ``out_dtype``: ``round_to`` must agree with it, and a 16-bit
        ``out_dtype`` without ``round_to`` warns, as ``check`` and ``mergekit-yaml``
        do. (mergekit-yaml's graph does not pass ``out_dtype``; its plan checks.)"""
        if out_dtype is not None:
            wanted = str(out_dtype).removeprefix("torch.")
            for group, values in zip(groups, parameters):
                round_to = values.get("round_to")
                if round_to is not None and round_to != wanted:
                    raise LSSFConfigError(
                        f"tensor {group.metadata.name}: lssf parameter `round_to: {round_to}` but out_dtype is "
                        f"{wanted}; pass round_to={wanted!r} or leave it out")
            if wanted in ("bfloat16", "float16") and any(v.get("round_to") is None for v in parameters):
                warnings.warn(f"lssf: out_dtype {wanted} without the lssf parameter `round_to: {wanted}`: the fused "
                              "weights are cast to nearest, which keeps only part of a small term", stacklevel=3)
        return super()._execute(groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype)


def method_spec() -> MergeMethodSpec:
    """mergekit's spec of ``lssf``, read from the one declaration (``PARAMETERS``):
    ``role`` per non-base model, every other parameter shared."""
    specs = []
    for p in PARAMETERS:
        if p.per_model:
            specs.append(ParameterSpec(p.name, p.annotation, ParameterScope.NON_BASE, description=p.doc))
        else:
            specs.append(ParameterSpec(p.name, p.annotation, ParameterScope.SHARED, default=p.default,
                                       description=p.doc))
    return MergeMethodSpec(
        name="lssf",
        pretty_name="LSSF (Low-Rank Safety Subspace Fusion)",
        reference_url="https://arxiv.org/abs/2602.00038",
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=2),
        parameters=tuple(specs),
    )


LSSF_METHOD = LSSFMergeMethod(method_spec(), lssf_kernel)
