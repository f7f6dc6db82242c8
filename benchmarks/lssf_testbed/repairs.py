"""Repairs of a fine-tune: mergekit-yaml runs of written recipes, and the controls.

* ``lssf`` (the paper's ``fusion: add``, the other parameters the package defaults;
  every recipe but the ``restore`` ones says ``fusion: add``, since the package default
  became ``restore`` on this evidence), ``lssf-calibrated``, ``lssf-alpha{a}``,
  ``lssf-rank10``, ``lssf-rank50``, ``task-arithmetic`` (the full safety vector), ``lssf-noise-floor``,
  ``lssf-restore``, ``lssf-noise-floor-restore``, and per-module ablations of ``lssf``
  (``ablate-attention``, ``ablate-mlp``, ``ablate-first-half``, ``ablate-second-half``:
  alpha 1 on those weights, 0 elsewhere, through mergekit filters).
* ``random-subspace`` (control): per fused weight, the same rank ``r`` and the same
  Frobenius norm of the added term as ``lssf``, along ``Q Q^T delta`` with ``Q`` random
  orthonormal (seeded per weight). Written with the package's kernel, not mergekit-yaml.
* ``random-restore`` (control of ``lssf-restore``): the same rank and Frobenius norm as
  ``lssf-restore``'s term, along ``Q Q^T (W_aligned - W_ft)``: does pulling back toward
  the aligned weights help only inside the safety subspace, or along any r directions?
  ``random-noise-floor-restore``: the same for ``lssf-noise-floor-restore``.
* ``random-spectrum`` / ``random-spectrum-restore`` (delta-independent controls of
  ``lssf`` / ``lssf-restore``): per weight, ``A diag(s) B^T`` with ``s`` the singular
  values of that repair's term (so the same rank and Frobenius norm) and ``A``, ``B``
  random orthonormal left and right factors. The ``Q Q^T delta`` controls above keep the
  part of delta inside a random subspace, which is much of delta when ``r`` is near a
  weight's row count; these keep nothing of delta but its spectrum.
* ``patch-reapplied`` (control, LoRA alignment only): the alignment LoRA itself merged
  into the fine-tune with peft: the upper reference for any safety patch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from typing import Dict, List

import torch
import yaml

from .training import is_done

BIN = os.path.dirname(sys.executable)


ABLATIONS = ("ablate-attention", "ablate-mlp", "ablate-first-half", "ablate-second-half")
# (name, kind, fusion, rank_rule) of each random control: kind "subspace" (Q Q^T delta) or
# "spectrum" (random factors, the repair's singular values); fusion and rank_rule name the
# lssf repair whose rank and norm it matches
CONTROLS = (("random-subspace", "subspace", "add", "entropy"), ("random-restore", "subspace", "restore", "entropy"),
            ("random-noise-floor-restore", "subspace", "restore", "noise_floor"),
            ("random-spectrum", "spectrum", "add", "entropy"), ("random-spectrum-restore", "spectrum", "restore", "entropy"))


def recipe_names(s, ablations: bool) -> List[str]:
    """The names of the mergekit-yaml repairs, in report order (``recipes`` keys)."""
    names = ["lssf", "lssf-calibrated", "task-arithmetic", "lssf-rank10", "lssf-rank50", "lssf-noise-floor", "lssf-restore",
             "lssf-noise-floor-restore"] + [f"lssf-alpha{a:g}" for a in s.alphas]
    return names + (list(ABLATIONS) if ablations else [])


def recipes(aligned: str, unaligned: str, finetuned: str, subspace: str, s, layers: int, ablations: bool) -> Dict[str, dict]:
    """name -> mergekit recipe (dict) for every mergekit-yaml repair of one fine-tune,
    in the order of ``recipe_names``."""
    def lssf(**p):
        p = {"fusion": "add", **p}  # the paper's rule unless a recipe says restore
        return {"merge_method": "lssf", "base_model": finetuned, "dtype": "float32", "parameters": p, "models": [
            {"model": aligned, "parameters": {"role": "aligned"}},
            {"model": unaligned, "parameters": {"role": "unaligned"}}]}

    out = {
        "lssf": lssf(),
        "lssf-calibrated": lssf(subspace=subspace),
        "task-arithmetic": {"merge_method": "task_arithmetic", "base_model": finetuned, "dtype": "float32", "models": [
            {"model": aligned, "parameters": {"weight": 1.0}}, {"model": unaligned, "parameters": {"weight": -1.0}}]},
        "lssf-rank10": lssf(rank=10),
        "lssf-rank50": lssf(rank=50),
        "lssf-noise-floor": lssf(rank_rule="noise_floor"),
        "lssf-restore": lssf(fusion="restore"),
        "lssf-noise-floor-restore": lssf(rank_rule="noise_floor", fusion="restore"),
    }
    for a in s.alphas:
        out[f"lssf-alpha{a:g}"] = lssf(alpha=a)
    if ablations:
        half = layers // 2
        only = lambda names: [{"filter": n, "value": 1.0} for n in names] + [{"value": 0.0}]  # noqa: E731
        out["ablate-attention"] = lssf(alpha=only(["self_attn"]))
        out["ablate-mlp"] = lssf(alpha=only(["mlp"]))
        out["ablate-first-half"] = lssf(alpha=only([f"layers.{i}." for i in range(half)]))
        out["ablate-second-half"] = lssf(alpha=only([f"layers.{i}." for i in range(half, layers)]))
    return {name: out[name] for name in recipe_names(s, ablations)}


def run_recipe(recipe: dict, path: str, recipe_path: str, log=print) -> None:
    """``mergekit-yaml recipe path --copy-tokenizer`` unless ``path`` is complete."""
    if is_done(path):
        return
    with open(recipe_path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp)
    log(f"  repair {os.path.basename(path)}: mergekit-yaml {recipe_path}")
    exe = os.path.join(BIN, "mergekit-yaml")
    shutil.rmtree(path + ".partial", ignore_errors=True)  # a crashed earlier attempt
    result = subprocess.run([exe if os.path.exists(exe) else "mergekit-yaml", recipe_path, path + ".partial", "--copy-tokenizer"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit-yaml {recipe_path} failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".partial", path)


def load_state(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, f)))
    return state


def fused_names(state: Dict[str, torch.Tensor]) -> List[str]:
    from mergekit_lssf.merge_method import VOCABULARY_NAME

    return [n for n, t in state.items() if t.ndim == 2 and t.is_floating_point() and not VOCABULARY_NAME.search(n)]


def _write_like(template: str, state: Dict[str, torch.Tensor], path: str) -> None:
    """A copy of model folder ``template`` with its weights replaced by ``state``."""
    from safetensors.torch import save_file

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


def random_control(aligned: str, unaligned: str, finetuned: str, path: str, seed: int, kind: str = "subspace",
                   fusion: str = "add", rank_rule: str = "entropy") -> Dict[str, float]:
    """A random control (module doc) of the lssf repair with ``fusion`` and ``rank_rule``
    (package defaults otherwise), per weight with that repair's rank ``r`` and the
    Frobenius norm of its term. ``kind="subspace"``: along ``Q Q^T delta`` (``"add"``) or
    ``Q Q^T (W_aligned - W_ft)`` (``"restore"``), ``Q`` [rows, r] random orthonormal;
    ``kind="spectrum"``: ``A diag(s) B^T``, ``s`` the term's r singular values, ``A``
    [rows, r] and ``B`` [cols, r] random orthonormal. Seeded per weight name; writes a
    model folder like ``finetuned`` at ``path``; returns the mean rank."""
    from mergekit_lssf.kernel import safety_factors
    from mergekit_lssf.parameters import DEFAULT_ETA, DEFAULT_MAX_RANK

    if kind not in ("subspace", "spectrum"):
        raise ValueError(f"random control kind {kind!r}: expected 'subspace' or 'spectrum'")
    al, un, ft = load_state(aligned), load_state(unaligned), load_state(finetuned)
    out, ranks = dict(ft), []
    for name in fused_names(ft):
        a, u, w = al[name].float(), un[name].float(), ft[name].float()
        factors = safety_factors(a, u, eta=DEFAULT_ETA, max_rank=DEFAULT_MAX_RANK, fusion=fusion,
                                  rank_rule=rank_rule).with_finetune(w)
        r = factors.info.rank
        ranks.append(r)
        if r == 0:
            continue
        reference = factors.left @ factors.right  # float32, as in the published runs
        generator = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        if kind == "spectrum":
            s = torch.linalg.svdvals(reference.double())[:r]
            term = (_orthonormal(w.shape[0], r, generator) * s) @ _orthonormal(w.shape[1], r, generator).T
        else:
            source = ((a - w) if fusion == "restore" else (a - u)).double()
            q = _orthonormal(w.shape[0], r, generator)
            term = q @ (q.T @ source)
            norm = term.norm()
            term = term * (float(reference.norm()) / float(norm)) if norm > 0 else term  # target norm in float32
        out[name] = (w.double() + term).to(ft[name].dtype)
    _write_like(finetuned, out, path)
    return {"mean_rank": sum(ranks) / max(len(ranks), 1)}


def patch_reapplied(adapter: str, finetuned: str, path: str) -> None:
    """The alignment LoRA adapter merged into the fine-tune (peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training import save

    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save(model, AutoTokenizer.from_pretrained(finetuned), path)
