"""What bfloat16 storage does to an lssf repair, per fused weight, and what the
precision-aware options give back.

    python benchmarks/bf16_rounding.py --aligned A --unaligned U --finetuned F --out DIR
    python benchmarks/bf16_rounding.py --tiny --out DIR        # generated toy models (CI smoke test)
    python benchmarks/bf16_rounding.py --planted --out DIR     # planted bf16 matrices, Llama-like shapes

The three model folders hold float32 safetensors (the testbed's models). Each weight
is cast to bfloat16, as a released checkpoint is stored, and upcast exactly, as a
recipe with ``dtype: float32`` gives it to lssf. For every fused weight and each of two
settings (the package defaults, and ``rank_rule: noise_floor``, both ``restore``):

* the rank from the float32 models and from the bf16 ones, the rounding edge and the
  signal rank (singular values above it);
* the share of the term kept along its direction after writing bf16 with
  round-to-nearest and with subspace-preserving rounding, the in-subspace error left
  (share of round-to-nearest's) and the error outside the subspace (share of ordinary
  uniform rounding), and the seconds the rounding took.

Writes DIR/bf16_rounding.json and DIR/bf16_rounding.md (a summary table per setting).
``--planted`` writes DIR/planted.md instead: bf16 fine-tune / aligned / unaligned
matrices whose restore term is a set number of ulps per entry, at fixed ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.repairs import load_state  # noqa: E402
from mergekit_lssf.kernel import safety_factors, write_fused  # noqa: E402
from mergekit_lssf.parameters import DEFAULT_ETA, DEFAULT_MAX_RANK  # noqa: E402
from mergekit_lssf.precision import ulp  # noqa: E402
from mergekit_lssf.safetensors_io import read_header  # noqa: E402
from mergekit_lssf.toy_models import ToySpec, build_toy_models, is_linear_weight  # noqa: E402
from mergekit_lssf.parameters import FusionSettings

SETTINGS = {
    "defaults (entropy, restore)": dict(rank_rule="entropy"),
    "noise_floor + restore": dict(rank_rule="noise_floor"),
}
BF16 = torch.bfloat16


def _one(ft: torch.Tensor, al: torch.Tensor, un: torch.Tensor, rule: str) -> Dict:
    """The measurements of one weight (float32 inputs ``ft``, ``al``, ``un``)."""
    common = dict(eta=DEFAULT_ETA, max_rank=DEFAULT_MAX_RANK, rank_rule=rule, fusion="restore")
    rank32 = safety_factors(al, un, FusionSettings(**common)).info.rank
    ft16, al16, un16 = (x.to(BF16).float() for x in (ft, al, un))
    factors = safety_factors(al16, un16, FusionSettings(**common)).with_finetune(ft16)
    choice = factors.info.choice
    row = dict(rank_float32=rank32, rank_bf16=choice.rank, capped=choice.capped, rounding_edge=choice.rounding_edge,
               signal_rank=choice.signal_rank, shape=list(ft.shape))
    if choice.rank == 0:
        return row
    nearest, plain = write_fused(ft16, factors, 1.0, out_dtype=BF16, rounding="nearest")
    started = time.perf_counter()
    _kept, written = write_fused(ft16, factors, 1.0, out_dtype=BF16, rounding="subspace")
    seconds = time.perf_counter() - started
    record = written.rounding
    spacing = ulp(ft16 + factors.left @ factors.right, BF16).double()
    k, d = factors.left.shape[1], factors.left.shape[0]
    ordinary = math.sqrt(float(spacing.square().sum()) / 12 * (1 - k / d))
    row.update(kept_nearest=plain.kept, kept_subspace=written.kept, seconds=seconds, plain_cast=record is None)
    if record is not None:  # else the plain cast kept the term within 1% and was written
        row.update(feedback_step=record.iterations,
                   in_subspace_left=record.in_subspace / record.in_subspace_plain if record.in_subspace_plain else 0.0,
                   outside_vs_ordinary=record.outside / ordinary if ordinary else 0.0)
    return row


def measure(aligned: str, unaligned: str, finetuned: str, log=print) -> Dict[str, List[Dict]]:
    al, un, ft = load_state(aligned), load_state(unaligned), load_state(finetuned)
    names = [n for n, t in ft.items() if is_linear_weight(n, t) and t.is_floating_point()]
    out: Dict[str, List[Dict]] = {}
    for label, setting in SETTINGS.items():
        rows = []
        for i, name in enumerate(names):
            row = _one(ft[name].float(), al[name].float(), un[name].float(), setting["rank_rule"])
            rows.append({"name": name, **row})
            if i % 50 == 0:
                log(f"{label}: {i + 1}/{len(names)} {name}")
        out[label] = rows
    return out


def _stats(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results: Dict[str, List[Dict]]) -> str:
    lines = ["| setting | weights | rank float32 | rank bf16 (capped) | signal rank | kept, round to nearest | "
             "kept, subspace rounding | plain cast written | in-subspace error left | outside error / ordinary | "
             "rounding s (total) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in results.items():
        fused = [r for r in rows if "kept_nearest" in r]
        fed = [r for r in fused if not r["plain_cast"]]
        lines.append(
            f"| {label} | {len(rows)} | {statistics.mean(r['rank_float32'] for r in rows):.1f} | "
            f"{statistics.mean(r['rank_bf16'] for r in rows):.1f} ({sum(r['capped'] for r in rows)}) | "
            f"{statistics.mean(r['signal_rank'] for r in rows):.1f} | "
            f"{_stats([r['kept_nearest'] for r in fused])} | {_stats([r['kept_subspace'] for r in fused])} | "
            f"{len(fused) - len(fed)} | "
            f"{_stats([r['in_subspace_left'] for r in fed])} | {_stats([r['outside_vs_ordinary'] for r in fed])} | "
            f"{sum(r['seconds'] for r in fused):.1f} |")
    lines.append("")
    lines.append("Means over fused weights (min-max). kept: <written - W_ft, T> / ||T||^2 for the term T "
                 "computed in float32 from the bf16 inputs; plain cast written: weights where round-to-nearest "
                 "kept the term within 1%, so subspace rounding wrote it; in-subspace error left (the other "
                 "weights): ||P E|| of subspace rounding over round-to-nearest's; outside: ||(I - P) E|| over "
                 "uniform rounding's.")
    return "\n".join(lines)


def planted(out: str) -> str:
    """Subspace rounding against round-to-nearest on planted bf16 matrices."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_precision import _bf16_triplet  # the test suite's generator: one definition

    lines = ["| shape | rank | term (ulp per entry) | kept, round to nearest | kept, subspace rounding | "
             "in-subspace error left | kept step | rounding s |", "|---|---|---|---|---|---|---|---|"]
    for (m, n), rank in (((1024, 4096), 16), ((1024, 4096), 64), ((4096, 1024), 16), ((4096, 4096), 32)):
        for term in (0.15, 0.4, 1.5):
            ft, al, un = _bf16_triplet(m, n, term)
            factors = safety_factors(al, un, FusionSettings(eta=0.9, rank=rank, fusion="restore")).with_finetune(ft)
            _y, plain = write_fused(ft, factors, 1.0, out_dtype=BF16, rounding="nearest")
            started = time.perf_counter()
            _y, written = write_fused(ft, factors, 1.0, out_dtype=BF16)
            seconds = time.perf_counter() - started
            r = written.rounding
            left, step = ("plain cast", "-") if r is None else (f"{r.in_subspace / r.in_subspace_plain:.3f}", r.iterations)
            lines.append(f"| {m}x{n} | {rank} | {term} | {plain.kept:.3f} | {written.kept:.3f} | "
                         f"{left} | {step} | {seconds:.2f} |")
    text = "\n".join(lines)
    with open(os.path.join(out, "planted.md"), "w", encoding="utf-8") as fp:
        fp.write(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aligned")
    parser.add_argument("--unaligned")
    parser.add_argument("--finetuned")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="Generated toy models (float32), for the smoke test.")
    parser.add_argument("--planted", action="store_true", help="Planted bf16 matrices instead of models.")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.planted:
        print(planted(args.out))
        return
    if args.tiny:
        paths = build_toy_models(os.path.join(args.out, "toy"), ToySpec(size="tiny", safety_scale=0.002,
                                                                          noise_scale=0.0001, drift_scale=0.0005, erosion=0.7))
        args.aligned, args.unaligned, args.finetuned = paths["aligned"], paths["unaligned"], paths["finetuned"]
    elif not (args.aligned and args.unaligned and args.finetuned):
        parser.error("give --aligned, --unaligned and --finetuned, or --tiny")
    for flag in ("aligned", "unaligned", "finetuned"):
        folder = getattr(args, flag)
        files = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
        if not files:
            parser.error(f"--{flag} {folder}: no safetensors model there")
        header, _ = read_header(os.path.join(folder, files[0]))
        if any(v.get("dtype") != "F32" for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2):
            parser.error(f"--{flag} {folder}: the benchmark casts float32 models to bf16 itself; this one is not float32")
    started = time.perf_counter()
    results = measure(args.aligned, args.unaligned, args.finetuned)
    text = table(results)
    with open(os.path.join(args.out, "bf16_rounding.json"), "w", encoding="utf-8") as fp:
        json.dump({"models": {k: getattr(args, k) for k in ("aligned", "unaligned", "finetuned")},
                   "seconds": time.perf_counter() - started, "results": results}, fp, indent=1)
    with open(os.path.join(args.out, "bf16_rounding.md"), "w", encoding="utf-8") as fp:
        fp.write(text + "\n")
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
