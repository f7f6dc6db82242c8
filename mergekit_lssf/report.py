"""``mergekit-lssf report``: ranks and spectra of every tensor a recipe fuses.

Writes ``report.json`` (``{"tensors": [...], "summary": {...}}``), ``report.csv``,
``rank_heatmap.png`` (rank by layer and module) and ``entropy_curves.png`` (the
retained-entropy curve ``H_rho / H_n`` of a few representative tensors, with eta
and the chosen rank marked). For 16-bit inputs each row also has the rounding edge
of delta and the signal rank (singular values above it). For ``fusion: contrastive``
the rank is ``k``, the spectrum is ``mu`` (Eq. 5-7 read ``p ∝ mu``), and each row has
the term's norm against ``||W_aligned - W_ft||`` (``term_ratio``), computed by the
merge's own kernel. No model is written.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

import torch

from mergekit_lssf.kernel import spectral_entropy
from mergekit_lssf.stats import SIGNAL_SHARE_WARNING
from mergekit_lssf.plan import LSSFPlan
from mergekit_lssf.traversal import FusedTensor, fused_factors

#: The files ``build_report`` writes (an output folder holding any of them is refused).
OUTPUTS = ("report.json", "report.csv", "rank_heatmap.png", "entropy_curves.png")

FIELDS = [
    "name", "layer", "module", "shape", "rank", "rank_rule", "fusion", "entropy_rank",
    "noise_floor_rank", "noise_floor_tau", "capped", "max_rank", "eta",
    "entropy_total", "entropy_share", "energy_share", "sigma_1", "spectrum", "rounding_edge",
    "signal_rank", "lam", "term_norm", "gap_norm", "term_ratio",
]


def _row(t: FusedTensor) -> Dict:
    info = t.factors.info
    c = info.choice
    alpha = t.parameters["alpha"]
    contrastive = t.parameters["fusion"] == "contrastive"
    return {
        "name": t.name, "layer": t.layer, "module": t.module, "shape": list(t.shape),
        "rank": c.rank, "rank_rule": c.rule, "fusion": t.parameters["fusion"],
        "entropy_rank": c.entropy_rank, "noise_floor_rank": c.noise_floor_rank,
        "noise_floor_tau": c.tau, "capped": c.capped,
        "max_rank": t.parameters["max_rank"], "eta": t.parameters["eta"],
        "entropy_total": c.entropy_total, "entropy_share": c.entropy_share,
        "energy_share": c.energy_share, "sigma_1": t.factors.info.sigma_1,
        "spectrum": c.spectrum, "rounding_edge": c.rounding_edge, "signal_rank": c.signal_rank,
        "lam": t.parameters["lam"] if contrastive else None,
        "term_norm": abs(alpha) * info.term_norm if info.term_norm is not None else None,
        "gap_norm": info.gap_norm, "term_ratio": info.term_ratio(alpha),
    }


def build_report(plan: LSSFPlan, out_dir: str, *, cuda: bool = False, log=print) -> Dict:
    """Compute the report of a planned recipe and write it under ``out_dir``; the
    contrastive weights' ``k`` and term ratio also go to ``log``, one line each
    (``contrastive_lines``; nothing for the other fusions)."""
    rows: List[Dict] = []
    curves: Dict[str, List[float]] = {}
    for tensor in fused_factors(plan, cuda=cuda, factors=False):
        rows.append(_row(tensor))
        sigma = tensor.factors.sigma
        if tensor.parameters["fusion"] == "contrastive":  # mu: Eq. 5-7 read p ∝ mu, so sigma^2 = mu
            sigma = sigma.to(torch.float64).clamp(min=0).sqrt()
        cum, _ = spectral_entropy(sigma)
        total = float(cum[-1]) if cum.numel() else 0.0
        curves[tensor.name] = (cum / total).tolist() if total > 0 else []
    ranks = [r["rank"] for r in rows]
    ratios = [r["term_ratio"] for r in rows if r["term_ratio"] is not None]
    summary = {
        "tensors": len(rows),
        "rank_min": min(ranks, default=0),
        "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
        "rank_max": max(ranks, default=0),
        "capped": sum(r["capped"] for r in rows),
        "rank_zero": sum(r["rank"] == 0 for r in rows),
        "rank_rules": sorted({r["rank_rule"] for r in rows}),
        "fusions": sorted({r["fusion"] for r in rows}),
        "patch_parameters": sum(r["rank"] * sum(r["shape"]) for r in rows),
        "sixteen_bit_inputs": sum(r["signal_rank"] is not None for r in rows),
        "signal_rank_mean": _mean([r["signal_rank"] for r in rows if r["signal_rank"] is not None]),
        "capped_above_signal": sum(bool(r["capped"] and r["signal_rank"] is not None
                                        and r["signal_rank"] < SIGNAL_SHARE_WARNING * r["rank"]) for r in rows),
        "contrastive": len(ratios),
        "term_ratio_min": min(ratios, default=None),
        "term_ratio_median": _median(ratios),
        "term_ratio_max": max(ratios, default=None),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as fp:
        json.dump({"tensors": rows, "summary": summary}, fp, indent=2)
    with open(os.path.join(out_dir, "report.csv"), "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "shape": "x".join(map(str, row["shape"]))})
    if rows:
        _plot_heatmap(rows, os.path.join(out_dir, "rank_heatmap.png"))
        _plot_curves(rows, curves, os.path.join(out_dir, "entropy_curves.png"))
    result = {"tensors": rows, "summary": summary}
    for line in contrastive_lines(result):
        log(line)
    return result


def _mean(values: List) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _median(values: List) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def contrastive_lines(result: Dict) -> List[str]:
    """One line per contrastive weight (``k`` and ``||term|| / ||W_aligned - W_ft||``) and
    a summary line, for printing; empty when the recipe fuses nothing contrastively."""
    rows = [r for r in result["tensors"] if r["term_ratio"] is not None]
    if not rows:
        return []
    s = result["summary"]
    lines = [f"{r['name']}: k {r['rank']}, ||term|| / ||W_aligned - W_ft|| {r['term_ratio']:.3g}" for r in rows]
    total = (f"{s['contrastive']} contrastive weights: ||term|| / ||W_aligned - W_ft|| min {s['term_ratio_min']:.3g} "
             f"/ median {s['term_ratio_median']:.3g} / max {s['term_ratio_max']:.3g}")
    return [*lines, total]


def representative(rows: List[Dict], count: int = 4) -> List[Dict]:
    """The lowest-, median- and highest-rank tensors, and the first one."""
    ordered = sorted(rows, key=lambda r: r["rank"])
    picks = [ordered[0], ordered[len(ordered) // 2], ordered[-1], rows[0]]
    unique = list({r["name"]: r for r in picks}.values())
    return unique[:count]


def _plot_heatmap(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules = sorted({r["module"] for r in rows})
    grid = [[float("nan")] * len(modules) for _ in layers]
    for r in rows:
        if r["layer"] is not None:
            grid[layers.index(r["layer"])][modules.index(r["module"])] = r["rank"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    rules = ", ".join(sorted({r["rank_rule"] for r in rows}))
    ax.set_title(f"LSSF rank r used per weight ({rules})")
    if len(layers) * len(modules) <= 400:
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{int(value)}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(rows: List[Dict], curves: Dict[str, List[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in representative(rows):
        curve = curves.get(r["name"]) or [0.0]
        line, = ax.plot(range(1, len(curve) + 1), curve, label=f"{r['name']} (r={r['rank']})")
        if r["rank"]:
            ax.plot([r["rank"]], [curve[r["rank"] - 1]], "o", color=line.get_color())
    for eta in sorted({r["eta"] for r in rows}):
        ax.axhline(eta, color="grey", linestyle="--", linewidth=0.8)
        ax.text(1, eta, f" eta={eta:g}", va="bottom", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("rank rho")
    ax.set_ylabel("H_rho / H_n")
    ax.set_ylim(0, 1.02)
    ax.set_title("Retained safety-spectrum entropy")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
