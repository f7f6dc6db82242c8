"""Why a repair works or not: per-weight statistics of the safety vector and the drift.

Per fused weight (``delta = W_aligned - W_reference``, ``drift = W_ft - W_aligned``):

* spectrum of delta against the Gavish-Donoho noise threshold: the energy share of the
  singular values above it, the noise-floor rank and the entropy rank (eta 0.9);
* overlap of the drift with the safety subspace, ``||U_r^T drift|| / ||drift||`` with
  ``U_r`` the top-r left singular vectors of delta (r = the entropy rank lssf uses by
  default), against ``sqrt(r / d_out)``, its expected value for random directions;
* the cosine of drift and delta (negative: the fine-tune walked back along delta).

Summaries per module (q_proj, ..., down_proj) and per layer.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from mergekit_lssf.kernel import data_free_subspace, noise_floor, output_basis, select_rank
from mergekit_lssf.parameters import DEFAULT_ETA, DEFAULT_MAX_RANK

from .repairs import fused_names, load_state

LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.(\w+)\.weight$")


def weight_statistics(aligned: str, reference: str, finetuned: str) -> List[Dict]:
    al, ref, ft = load_state(aligned), load_state(reference), load_state(finetuned)
    rows = []
    for name in fused_names(ft):
        delta = (al[name] - ref[name]).double()
        drift = (ft[name] - al[name]).double()
        sub = data_free_subspace(delta)
        sigma = sub.sigma
        choice = select_rank(sigma, eta=DEFAULT_ETA, max_rank=DEFAULT_MAX_RANK, shape=tuple(delta.shape))
        floor_rank, tau = noise_floor(sigma, tuple(delta.shape))
        energy = float(sigma.square().sum())
        r = choice.rank
        overlap = float("nan")
        if r and drift.norm() > 0:
            u = output_basis(sub, r, delta)
            u = u / u.norm(dim=0, keepdim=True)
            overlap = float((u.T @ drift).norm() / drift.norm())
        cos = _cosine(drift, delta)
        m = LAYER.search(name)
        rows.append({
            "name": name, "layer": int(m.group(1)) if m else None, "module": m.group(3) if m else name,
            "shape": list(delta.shape), "delta_rel_norm": float(delta.norm() / al[name].double().norm()),
            "energy_above_noise": float(sigma[sigma > tau].square().sum()) / energy if energy > 0 else 0.0,
            "noise_floor_rank": floor_rank, "entropy_rank": choice.entropy_rank, "rank": r,
            "drift_overlap": overlap, "random_overlap": math.sqrt(r / delta.shape[0]) if r else float("nan"),
            "drift_delta_cosine": cos, "drift_rel_norm": float(drift.norm() / al[name].double().norm()),
        })
    return rows


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two weights as flattened vectors; NaN when either is zero."""
    return float((a * b).sum() / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")


def summarise(rows: List[Dict], key: str) -> Dict[str, Dict[str, float]]:
    """Mean of every numeric statistic per ``key`` (``"module"`` or ``"layer"``)."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    fields = ["delta_rel_norm", "energy_above_noise", "noise_floor_rank", "entropy_rank", "drift_overlap",
              "random_overlap", "drift_delta_cosine", "drift_rel_norm"]
    out = {}
    for group, members in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])):
        out[str(group)] = {f: _mean([m[f] for m in members]) for f in fields}
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else float("nan")


def term_cosines(aligned: str, reference: str, finetuned: str, repaired: Sequence[str]) -> List[Dict[str, float]]:
    """Per repaired model (in order), per module, the mean over layers of the cosine
    between the repair's added term ``W_repaired - W_ft`` and delta ``W_aligned -
    W_reference`` (flattened weights). The three shared models are read once; the
    repaired ones one at a time. Shows how far a control is from random: a random-subspace
    control ``Q Q^T delta`` of rank r keeps about ``sqrt(r / d_out)`` of delta, so at high
    rank it is no null control."""
    al, ref, ft = load_state(aligned), load_state(reference), load_state(finetuned)
    out = []
    for path in repaired:
        rep, groups = load_state(path), defaultdict(list)
        for name in fused_names(ft):
            m = LAYER.search(name)
            groups[m.group(3) if m else name].append(_cosine(rep[name].double() - ft[name].double(),
                                                             al[name].double() - ref[name].double()))
        out.append({module: _mean(values) for module, values in sorted(groups.items())})
    return out


def direction_recovery(projections: Dict[str, List[float]], aligned: str = "aligned", finetuned: str = "finetuned") -> Dict[str, float]:
    """Per model, the mean over layers of ``(p - p_ft) / (p_aligned - p_ft)`` where ``p`` is
    the harmful-minus-benign activation gap along the refusal direction: 1 = back where
    the aligned model is, 0 = where the fine-tune is. Layers where aligned and fine-tune
    differ by less than 5% of the largest gap are left out (no signal to recover)."""
    if aligned not in projections or finetuned not in projections:
        return {}
    pa, pf = torch.tensor(projections[aligned]), torch.tensor(projections[finetuned])
    gap = pa - pf
    keep = gap.abs() > 0.05 * gap.abs().max() if gap.abs().max() > 0 else torch.zeros_like(gap, dtype=torch.bool)
    if not keep.any():
        return {name: float("nan") for name in projections}
    return {name: float(((torch.tensor(p) - pf)[keep] / gap[keep]).mean()) for name, p in projections.items()}
