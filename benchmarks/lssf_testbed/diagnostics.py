"""How far a repair's added term points along the safety vector, per module, and
how much of the fine-tune's drift lies in delta's leading subspace.

``term_cosines``: per fused weight, the cosine of ``W_repaired - W_ft`` with delta
``W_aligned - W_reference`` (flattened), averaged per module (q_proj, ..., down_proj).

``drift_overlap``: the share of the drift ``D = W_ft - W_aligned`` inside delta's top-r
left singular subspace ``U_r``, against a random r-dimensional subspace's share. A
restore along ``U_r`` removes ``U_r U_r^T D``; the random control removes a random
projection of D rescaled to the same norm. At equal norm the term that removes more
of D is the one whose subspace holds more of it: ``||U_r^T D|| / ||D||`` against
``sqrt(r / d_out)``, the random subspace's share in expectation.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from .frontier import spread
from .repairs import fused_names, load_state

LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.(\w+)\.weight$")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two weights as flattened vectors; NaN when either is zero."""
    return float((a * b).sum() / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")


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
        out.append({module: spread(values)["mean"] for module, values in sorted(groups.items())})
    return out


def drift_overlap(aligned: str, reference: str, finetuned: str, ranks: Sequence[int]) -> Dict[int, Dict[str, float]]:
    """rank r -> ``{"lssf": ..., "random": ...}``: over every fused weight, in float64,
    ``sqrt(sum ||U_r^T D||^2 / sum ||D||^2)`` with ``U_r`` the top-r left singular
    vectors of ``delta = W_aligned - W_reference`` and ``D = W_ft - W_aligned``, and the
    same for a random r-dimensional subspace in expectation,
    ``sqrt(sum (r / d_out) ||D||^2 / sum ||D||^2)`` (r capped at ``min(d_out, d_in)``)."""
    al, ref, ft = load_state(aligned), load_state(reference), load_state(finetuned)
    inside = {r: 0.0 for r in ranks}
    expected = {r: 0.0 for r in ranks}
    total = 0.0
    for name in fused_names(ft):
        delta = al[name].double() - ref[name].double()
        drift = ft[name].double() - al[name].double()
        u, _, _ = torch.linalg.svd(delta, full_matrices=False)
        energy = float(drift.square().sum())
        total += energy
        for r in ranks:
            k = min(r, u.shape[1])
            inside[r] += float((u[:, :k].T @ drift).square().sum())
            expected[r] += k / delta.shape[0] * energy
    return {r: {"lssf": (inside[r] / total) ** 0.5 if total else float("nan"),
                "random": (expected[r] / total) ** 0.5 if total else float("nan")} for r in ranks}
