"""The repairs as curves: each method at several strengths, one model per point.

Every curve starts at the fine-tune (strength 0: nothing repaired) and moves toward
more refusal and less task skill as its parameter grows:

* ``interpolate-{l}``: ``(1 - l) W_ft + l W_aligned`` (mergekit ``linear``), the first
  thing a user would try;
* ``lssf-restore-rank{r}``: LSSF with the package defaults (``fusion: restore``) at a
  fixed rank ``r`` per weight (capped by the weight's size);
* ``random-restore-rank{r}``: the same restore along a random rank-``r`` output
  subspace, with the norm of the matching ``lssf-restore-rank{r}`` term (control);
* ``lssf-alpha{a}``: the paper's ``fusion: add`` at strength ``a``;
* ``resta-{s}``: RESTA, the safety vector ``W_aligned - W_unaligned`` added by task
  arithmetic at scale ``s``; ``resta-dare-{s}``: the same with DARE on the fine-tune's
  update (mergekit ``dare_linear``, ``Settings.dare_density``);
* ``safe-lora-{q}``: Safe LoRA, the fine-tune's update projected onto the safety
  vector's column space on the share ``q`` of weights where it is least aligned with it.
* ``contrastive-{lam}`` (issue 47): the package's data-aware repair, ``fusion:
  contrastive`` with a calibration of the fine-tune on the task's training rows against
  the ``harmful_train`` prompts answered by the aligned model (``calibrate --max-rank
  full``: the closed form itself); ``lam`` falls along the curve (more repair);
* ``keep-{lam}``: its control, the same task Gram with ``C_H = I`` (``calibrate
  --keep-control``: "roll back every direction the task does not use").
* ``antidote-{ratio}``: Antidote (``benchmarks/baselines/antidote.py``), the top
  ``ratio`` of each fused weight of the fine-tune by ``|W_ij| ||X_j||`` set to zero, X over
  the ``harmful_train`` prompts with the unaligned model's own compliant answers;
* ``safedelta-{budget}``: Safe Delta (``benchmarks/baselines/safedelta.py``), the
  fine-tune's weight changes kept greedily within a relative safety budget with the OBS
  correction, H over the ``harmful_train`` prompts with the aligned model's refusals
  through the aligned model; the budget falls along the curve (more repair);
* ``safedelta-exclude0-{budget}``: the same with ``exclude = 0``: upstream never keeps the
  fine-tune's change on the 15% most safety-sensitive columns of each weight, which caps
  the utility its curve can keep (budget 1 keeps every other change); without the
  exclusion budget 1 is the fine-tune itself and the curve spans the whole range;
* ``antidote-update-{ratio}``: the same Antidote scores on the fine-tune's **update**
  ``W_ft - W_aligned``, the pruned entries set back to the aligned weights (the analogue
  of upstream's LoRA mode; ``antidote_states(..., aligned_dir=...)``): the literal
  variant zeroes merged weights, aligned weight included.

At seed 0 of the ``PRIMARY`` cells only (``SEED0_CURVES``, ``points(s, seed0=True)``):

* ``contrastive-benign-{lam}``: ``fusion: contrastive`` with the benign-only calibration
  (``calibrate`` without ``--task``: the shipped benign ``train`` prompts answered by the
  fine-tune), for users without task data;
* ``contrastive-rank{k}``: the contrastive calibration truncated to its leading ``k``
  vectors per input site (``rank: k``) at ``lam = CONTRASTIVE_RANK_LAM``;
* ``contrastive-0.3`` (``Settings.contrastive_seed0_lams``): the contrastive curve one
  step further;
* ``calibrated-restore-rank{r}``: the paper's calibrated subspace (Eq. 4, ``calibrate
  ALIGNED``, the ``harmful_train`` anchors with the aligned model's refusals) used with
  ``subspace:`` and ``fusion: restore`` at rank ``r``.

None of them is a candidate of a choice (``CHOICES``): every seed chooses among the same
points.

Single points (``RULES``): ``lssf-restore`` (every package default: the entropy rule),
``lssf-noise-floor-restore`` and ``lssf-signal-restore`` (the other rank rules), and
``safe-lora``, the Safe LoRA point chosen on validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

# (curve, what its parameter is) in report order
CURVES = (("interpolate", "l"), ("lssf-restore-rank", "rank"), ("random-restore-rank", "rank"), ("lssf-alpha", "alpha"),
          ("resta", "scale"), ("resta-dare", "scale"), ("safe-lora", "share projected"), ("contrastive", "lam"),
          ("keep", "lam"), ("antidote", "ratio"), ("antidote-update", "ratio"), ("safedelta", "budget"),
          ("safedelta-exclude0", "budget"),
          ("contrastive-benign", "lam"), ("contrastive-rank", "rank"), ("calibrated-restore-rank", "rank"))
# the curves built at seed 0 of the PRIMARY cells only (and ``contrastive``'s ``contrastive_seed0_lams``)
SEED0_CURVES = ("contrastive-benign", "contrastive-rank", "calibrated-restore-rank")
# curve -> the calibration file its recipes read (``Testbed.calibration``): ``contrastive`` (the
# task's rows), ``keep`` (its C_H = I control), ``benign`` (no task file) and ``calibrated`` (Eq. 4)
CALIBRATION_OF = {"contrastive": "contrastive", "contrastive-rank": "contrastive", "keep": "keep",
                  "contrastive-benign": "benign", "calibrated-restore-rank": "calibrated"}
# the lam of every contrastive-rank{k} point (issue 47: "truncation at lam 3"); a constant, not a
# setting: a curve point's parameter (settings.CURVE_POINTS) must not change a model already built
CONTRASTIVE_RANK_LAM = 3.0
# the peer curves written by ``benchmarks/baselines`` (``Testbed.peer_baseline``)
PEERS = ("antidote", "antidote-update", "safedelta", "safedelta-exclude0")
# single points: the package defaults and the other rank rules of lssf-restore
RULES = ("lssf-restore", "lssf-noise-floor-restore", "lssf-signal-restore")
# Chosen on the validation splits by one rule fixed before any test result was read
# (``Testbed.choose``): the candidate with the most validation refusal among those that
# keep at least ``Settings.utility_floor`` of the fine-tune's validation task NLL, ties
# and "none does" to the earliest candidate (the smallest share, rank, alpha or step).
# model -> (its name as a method, the curves and single points it chooses among)
CHOICES = {
    "safe-lora": ("safe-lora, chosen on validation", ("safe-lora",)),
    "lssf-chosen": ("lssf, chosen on validation", ("lssf-restore-rank", "lssf-alpha") + RULES),
    "interpolate-chosen": ("interpolate, chosen on validation", ("interpolate",)),
    "contrastive-chosen": ("contrastive, chosen on validation", ("contrastive",)),
    "antidote-chosen": ("antidote, chosen on validation", ("antidote",)),
    "antidote-update-chosen": ("antidote-update, chosen on validation", ("antidote-update",)),
    "safedelta-chosen": ("safedelta, chosen on validation", ("safedelta",)),
    "safedelta-exclude0-chosen": ("safedelta-exclude0, chosen on validation", ("safedelta-exclude0",)),
}
CHOSEN_METHODS = {model: method for model, (method, _) in CHOICES.items()}
SINGLES = RULES + tuple(CHOSEN_METHODS.values())  # the methods that are one point, not a curve


@dataclass(frozen=True)
class Point:
    """One model of a curve: ``name`` (its folder), ``curve`` (``CURVES``) and the
    curve's parameter ``value``."""

    name: str
    curve: str
    value: float


def points(s, seed0: bool = False) -> List[Point]:
    """Every curve point of settings ``s``, in report order; ``seed0``: with the seed-0
    families (``SEED0_CURVES`` and ``contrastive``'s ``contrastive_seed0_lams``)."""
    values = {"interpolate": s.interpolations, "lssf-restore-rank": s.ranks, "random-restore-rank": s.ranks,
              "lssf-alpha": s.alphas, "resta": s.resta_scales, "resta-dare": s.resta_scales,
              "safe-lora": s.safe_lora_shares, "contrastive": s.contrastive_lams, "keep": s.keep_lams,
              "antidote": s.antidote_ratios, "antidote-update": s.antidote_ratios, "safedelta": s.safedelta_budgets,
              "safedelta-exclude0": s.safedelta_exclude0_budgets}
    if seed0:
        values.update({"contrastive": tuple(dict.fromkeys(tuple(s.contrastive_lams) + tuple(s.contrastive_seed0_lams))),
                       "contrastive-benign": s.benign_lams, "contrastive-rank": s.contrastive_ranks,
                       "calibrated-restore-rank": s.calibrated_ranks})
    out = []
    for curve, _ in CURVES:
        sep = "" if curve.endswith("rank") or curve == "lssf-alpha" else "-"
        out += [Point(f"{curve}{sep}{v:g}", curve, float(v)) for v in values.get(curve, ())]
    return out


def candidates(s, chosen: str) -> List[str]:
    """The models ``chosen`` (a key of ``CHOICES``) chooses among, earliest first: its
    curves' every-seed points in parameter order, then its single points."""
    among = CHOICES[chosen][1]
    return [p.name for p in points(s) if p.curve in among] + [r for r in among if r in RULES]


def repair_names(s, seed0: bool = False) -> List[str]:
    """The names of every repair of one fine-tune (``seed0``: with the seed-0 families):
    the curve points, the rules and the points chosen on validation (``CHOICES``, built
    after their candidates; one whose curves have no point in ``s`` is left out)."""
    return [p.name for p in points(s, seed0)] + list(RULES) + [c for c in CHOICES if candidates(s, c)]
