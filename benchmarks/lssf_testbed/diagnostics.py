"""How far a repair's added term points along the safety vector, per module.

``term_cosines``: per fused weight, the cosine of ``W_repaired - W_ft`` with delta
``W_aligned - W_reference`` (flattened), averaged per module (q_proj, ..., down_proj).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from .repairs import fused_names, load_state

LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.(\w+)\.weight$")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two weights as flattened vectors; NaN when either is zero."""
    return float((a * b).sum() / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")


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
