"""Repairs of a fine-tune (``curves.py`` names them): written mergekit recipes, run
through mergekit's ``run_merge`` where mergekit can express the repair, the rest
written here.

Recipes compute in float32 and write the cell's storage dtype (``out_dtype``), as a
user should. Written here, with the same float32 compute and one cast at the end:

* ``random-restore-rank{r}`` (control of ``lssf-restore-rank{r}``): per fused weight,
  ``Q Q^T (W_aligned - W_ft)`` with ``Q`` [d_out, r'] random orthonormal (seeded per
  weight name), ``r'`` and the Frobenius norm those of the lssf term at rank ``r``:
  does pulling back toward the aligned weights help only inside the safety subspace?
* ``safe-lora-{q}`` (Safe LoRA, Hsu et al. 2024, as in IBM/SafeLoRA and PEFT's
  ``safelora.py``): per fused weight ``V = W_aligned - W_unaligned``,
  ``C = V V^T / ||V||_F`` and the fine-tune's update ``dW = W_ft - W_aligned``; the
  share ``q`` of weights with the lowest cosine between ``C dW`` and ``dW`` get
  ``W_aligned + C dW`` (PEFT's ``select_layers_type="number"``), the others keep
  ``W_ft``.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from typing import Dict, List, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_lssf.kernel import safety_factors
from mergekit_lssf.fused import fuses
from mergekit_lssf.parameters import DEFAULT_ETA, DEFAULT_MAX_RANK

from .curves import CALIBRATION_OF, CONTRASTIVE_RANK_LAM, points
from .training import is_done
from mergekit_lssf.parameters import FusionSettings

def recipes(aligned: str, unaligned: str, finetuned: str, s, dtype: str,
            calibrations: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """name -> mergekit recipe (dict) of every repair of one fine-tune that mergekit
    can express: the ``interpolate``, ``lssf-restore-rank``, ``lssf-alpha``, ``resta``
    and ``resta-dare`` points and the rules, and with ``calibrations`` (calibration kind
    of ``curves.CALIBRATION_OF`` -> its file, built or not) the points of the curves that
    read one, seed-0 families included; computed in float32, written in ``dtype``."""
    precision = {"dtype": "float32", "out_dtype": dtype}
    # lssf rounds its own 16-bit output (subspace-preserving), as the published runs did
    round_to = {"round_to": dtype} if dtype in ("bfloat16", "float16") else {}

    def lssf(**p):
        return {"merge_method": "lssf", "base_model": finetuned, **precision, "parameters": {**p, **round_to}, "models": [
            {"model": aligned, "parameters": {"role": "aligned"}},
            {"model": unaligned, "parameters": {"role": "unaligned"}}]}

    def contrastive(calibration: str, lam: float, **p):
        # fusion: contrastive reads the aligned model and the calibration only
        return {"merge_method": "lssf", "base_model": finetuned, **precision,
                "parameters": {"fusion": "contrastive", "calibration": calibration, "lam": lam, **p, **round_to},
                "models": [{"model": aligned, "parameters": {"role": "aligned"}}]}

    def resta(scale: float, density: float = 1.0):
        ft = {"weight": 1.0, **({"density": density} if density < 1 else {})}
        return {"merge_method": "dare_linear" if density < 1 else "task_arithmetic", "base_model": aligned, **precision,
                "models": [{"model": finetuned, "parameters": ft},
                           {"model": unaligned, "parameters": {"weight": -scale, **({"density": 1.0} if density < 1 else {})}}]}

    out = {"lssf-restore": lssf(), "lssf-noise-floor-restore": lssf(rank_rule="noise_floor"),
           "lssf-signal-restore": lssf(spectrum="signal")}
    for p in points(s, seed0=True):
        calibration = (calibrations or {}).get(CALIBRATION_OF.get(p.curve, ""))
        if p.curve == "interpolate":
            out[p.name] = {"merge_method": "linear", **precision, "models": [
                {"model": finetuned, "parameters": {"weight": 1.0 - p.value}},
                {"model": aligned, "parameters": {"weight": p.value}}]}
        elif p.curve == "lssf-restore-rank":
            out[p.name] = lssf(rank=int(p.value))
        elif p.curve == "lssf-alpha":
            out[p.name] = lssf(fusion="add", alpha=p.value)
        elif p.curve == "resta":
            out[p.name] = resta(p.value)
        elif p.curve == "resta-dare":
            out[p.name] = resta(p.value, s.dare_density)
        elif calibration is None:
            continue
        elif p.curve in ("contrastive", "keep", "contrastive-benign"):
            out[p.name] = contrastive(calibration, p.value)
        elif p.curve == "contrastive-rank":
            out[p.name] = contrastive(calibration, CONTRASTIVE_RANK_LAM, rank=int(p.value))
        elif p.curve == "calibrated-restore-rank":
            out[p.name] = lssf(subspace=calibration, rank=int(p.value))
    return out


def run_recipe(recipe: dict, path: str, recipe_path: str, log=print, seed: int = 0) -> None:
    """Write ``recipe`` to ``recipe_path`` and run it as ``mergekit-yaml recipe_path path
    --copy-tokenizer --random-seed seed`` would, in this process (mergekit's
    ``run_merge``, with the package's recipe check and summary; the seed fixes DARE's
    random drops), unless ``path`` is complete."""
    if is_done(path):
        return
    with open(recipe_path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp)
    log(f"  repair {os.path.basename(path)}: {recipe_path}")
    shutil.rmtree(path + ".partial", ignore_errors=True)  # a crashed earlier attempt
    run_merge(MergeConfiguration.model_validate(recipe), path + ".partial",
              MergeOptions(copy_tokenizer=True, random_seed=seed, quiet=True), config_source=yaml.safe_dump(recipe))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".partial", path)


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the model folder ``path`` (all its safetensors shards), as stored."""
    state = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, f)))
    return state


def fused_names(state: Dict[str, torch.Tensor]) -> List[str]:
    """The weights LSSF fuses (``mergekit_lssf.fused.fuses``)."""
    return [n for n, t in state.items() if fuses(n, tuple(t.shape), t.is_floating_point())]


def _write_like(template: str, state: Dict[str, torch.Tensor], path: str) -> None:
    """A copy of model folder ``template`` with its weights replaced by ``state``."""
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(template, partial, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] float64 with orthonormal columns, from a seeded Gaussian."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by ``seed`` and the weight's name."""
    return torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


def random_restore(aligned: str, unaligned: str, finetuned: str, path: str, seed: int, rank: int, dtype: str) -> Dict:
    """``random-restore-rank{rank}`` (module doc), written like ``finetuned`` at ``path``
    in ``dtype``; returns the mean rank."""
    al, un, ft = load_state(aligned), load_state(unaligned), load_state(finetuned)
    out, ranks = dict(ft), []
    for name in fused_names(ft):
        a, u, w = al[name].float(), un[name].float(), ft[name].float()
        factors = safety_factors(a, u, FusionSettings(eta=DEFAULT_ETA, max_rank=DEFAULT_MAX_RANK, rank=rank, fusion="restore")).with_finetune(w)
        r = factors.info.rank
        ranks.append(r)
        term = torch.zeros_like(w, dtype=torch.float64)
        if r > 0:
            q = _orthonormal(w.shape[0], r, _generator(seed, name))
            term = q @ (q.T @ (a - w).double())
            norm = float(term.norm())
            term = term * (float((factors.left @ factors.right).norm()) / norm) if norm > 0 else term
        out[name] = w.double() + term
    _write_like(finetuned, _cast(out, dtype), path)
    return {"mean_rank": sum(ranks) / max(len(ranks), 1)}


def _safe_lora_term(a: torch.Tensor, u: torch.Tensor, w: torch.Tensor):
    """``(C dW, cosine(C dW, dW))`` of one weight in float64 (``C dW = V (V^T dW) / ||V||_F``,
    never forming the [d_out, d_out] matrix C)."""
    v, dw = a.double() - u.double(), w.double() - a.double()
    norm = float(v.norm())
    if norm == 0 or float(dw.norm()) == 0:
        return torch.zeros_like(dw), float("nan")
    term = v @ (v.T @ dw) / norm
    denominator = float(term.norm()) * float(dw.norm())
    return term, (float((term * dw).sum()) / denominator if denominator > 0 else float("nan"))


def safe_lora(aligned: str, unaligned: str, finetuned: str, path: str, share: float, dtype: str) -> Dict:
    """``safe-lora-{share}`` (module doc) written like ``finetuned`` at ``path`` in
    ``dtype``; returns the threshold (the largest projected cosine), how many weights
    were projected, and every fused weight's cosine (NaN where the fine-tune or the
    safety vector leaves it unchanged)."""
    al, un, ft = load_state(aligned), load_state(unaligned), load_state(finetuned)
    names = fused_names(ft)
    terms = {n: _safe_lora_term(al[n], un[n], ft[n]) for n in names}
    ranked = sorted((c, n) for n, (_, c) in terms.items() if c == c)
    chosen = ranked[:math.ceil(share * len(ranked))]
    out = dict(ft)
    for _, n in chosen:
        out[n] = al[n].double() + terms[n][0]
    _write_like(finetuned, _cast(out, dtype), path)
    return {"threshold": chosen[-1][0] if chosen else float("nan"), "projected": len(chosen), "weights": len(names),
            "cosines": {n: c for n, (_, c) in terms.items()}}


def _cast(state: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """Every floating-point tensor of ``state`` cast once to ``dtype``."""
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
