"""``mergekit-lssf demo``: toy models, the packaged demo recipe, and what it restored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from typing import Dict

import click
import torch
from safetensors.torch import load_file

from mergekit_lssf.calibrate import calibrate, default_anchors
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.toy_models import ToySpec, build_toy_models
from mergekit_lssf.traversal import fused_factors


def demo_recipe_text(name: str = "demo.yml") -> str:
    """The packaged demo recipe ``mergekit_lssf/recipes/NAME`` (in every install kind)."""
    return resources.files("mergekit_lssf").joinpath("recipes", name).read_text("utf-8")


def run_demo(workdir: str, size: str, device: str, calibrated: bool) -> None:
    """Build the toy models in ``workdir``, merge them with the demo recipe and print
    what the output restored (see ``report_restoration``)."""
    cuda = device == "cuda"
    claim_folder(workdir, "--workdir")
    merged = os.path.join(workdir, "merged")
    remove_own_folder(merged)  # the demo's own output from an earlier run, and nothing else
    click.echo(f"Building toy models ({size}) in {workdir}/ ...")
    build_toy_models(workdir, ToySpec(size=size))
    name = "demo-calibrated.yml" if calibrated else "demo.yml"
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as fp:
        fp.write(demo_recipe_text(name))
    if calibrated:
        demo_calibration(workdir, cuda)
    claim_folder(merged, "the merge's output")
    command = [mergekit_yaml(), name, "merged"] + (["--cuda"] if cuda else [])
    click.echo(f"Running in {workdir}/: " + " ".join(command))
    # no MERGEKIT_LSSF_ROLE_CHECK=0 here: the role check stays quiet on this correct recipe
    result = subprocess.run(command, cwd=workdir)
    if result.returncode != 0:
        raise click.ClickException(f"mergekit-yaml failed with exit code {result.returncode}")
    report_restoration(workdir, merged, name)
    if calibrated:
        click.echo(
            "Note: the toy models' planted delta is random, not tied to activations, so a "
            "calibrated subspace restores only the part of it that the anchors' activations "
            "reach; on real models that part is the point (paper Eq. 4)."
        )


#: The file that marks a folder as created by the demo: only such a folder is written
#: into again or removed by a later run (issue 49: nothing the package runs replaces or
#: deletes a file it did not create).
DEMO_MARKER = ".mergekit-lssf-demo"


def claim_folder(folder: str, what: str) -> None:
    """Make ``folder`` the demo's: create it with the marker, or mark it when it is
    empty; a folder that holds files and no marker is refused (one line, nothing
    written), since the demo would overwrite them."""
    marker = os.path.join(folder, DEMO_MARKER)
    if os.path.isdir(folder) and os.path.exists(marker):
        return
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise LSSFConfigError(
            f"demo: {what} {folder} already exists and was not created by `mergekit-lssf demo` (it has no "
            f"{DEMO_MARKER} file); the demo overwrites nothing it did not create: choose a new --workdir, "
            f"or remove {folder} yourself (nothing was written or deleted)"
        )
    os.makedirs(folder, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as fp:
        fp.write("created by mergekit-lssf demo; a later demo run may overwrite or remove this folder\n")


def remove_own_folder(folder: str) -> None:
    """Remove ``folder`` only when it carries the demo's marker; refuse otherwise."""
    if not os.path.lexists(folder):
        return
    if os.path.isdir(folder) and not os.path.islink(folder) and os.path.exists(os.path.join(folder, DEMO_MARKER)):
        shutil.rmtree(folder)
        return
    raise LSSFConfigError(
        f"demo: {folder} was not written by `mergekit-lssf demo` (it has no {DEMO_MARKER} file); the demo "
        f"deletes nothing it did not create: remove {folder} yourself, or choose a new --workdir "
        "(nothing was written or deleted)"
    )


def demo_calibration(workdir: str, cuda: bool) -> None:
    anchors = os.path.join(workdir, "anchors.jsonl")
    with open(anchors, "w", encoding="utf-8") as fp:
        for a in default_anchors()[:16]:
            fp.write(json.dumps({"prompt": a.prompt, "response": "I can't help with that."}) + "\n")
    click.echo("Calibrating the safety subspace of ./aligned on 16 HarmBench anchors ...")
    meta = calibrate(os.path.join(workdir, "aligned"), os.path.join(workdir, "subspace.safetensors"),
               anchors_path=anchors, device="cuda" if cuda else "cpu", progress=True)
    click.echo(f"  {meta['tokens']} tokens, {meta['seconds']} s -> subspace.safetensors")


def mergekit_yaml() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return exe if os.path.exists(exe) else "mergekit-yaml"


def _recipe_ranks(workdir: str, recipe: str) -> Dict[str, int]:
    """Rank per fused tensor as the recipe's merge chooses it (its eta, max_rank and
    subspace), via the same traversal as `mergekit-lssf report`."""
    previous = os.getcwd()
    os.chdir(workdir)  # recipe paths are relative to the demo folder
    try:
        plan = plan_recipe(load_recipe(recipe))
        return {t.name: t.factors.info.rank for t in fused_factors(plan, quiet=True, factors=False)}
    finally:
        os.chdir(previous)


def report_restoration(workdir: str, merged: str, recipe: str) -> Dict[str, Dict[str, float]]:
    """Print, per fused tensor, its rank and the share of the planted delta restored.

    ``safety`` is the coefficient of ``W - W_unaligned`` along the planted safety
    delta ``S`` (aligned model = 1.00); ``drift`` the coefficient along the
    fine-tune's task drift ``D`` (fine-tune = 1.00, so the task is kept).
    """
    load = lambda role: load_file(os.path.join(workdir, role, "model.safetensors"))  # noqa: E731
    unaligned, finetuned = load("unaligned"), load("finetuned")
    merged_state = {}
    for file in sorted(os.listdir(merged)):
        if file.endswith(".safetensors"):
            merged_state.update(load_file(os.path.join(merged, file)))
    planted = load_file(os.path.join(workdir, "planted.safetensors"))
    ranks = _recipe_ranks(workdir, recipe)
    rows = {}
    click.echo(f"\n{'tensor':44s} {'rank':>5s} {'safety ft':>9s} {'safety out':>10s} {'drift out':>9s}")
    for key in sorted(k[: -len(".safety")] for k in planted if k.endswith(".safety")):
        s, d = planted[key + ".safety"].double(), planted[key + ".drift"].double()
        coef = lambda w, v: float(((w.double() - unaligned[key].double()) * v).sum() / (v * v).sum())  # noqa: E731
        rank = ranks[key]
        rows[key] = {
            "rank": rank,
            "safety_finetuned": coef(finetuned[key], s),
            "safety_merged": coef(merged_state[key], s),
            "drift_merged": coef(merged_state[key], d),
        }
        r = rows[key]
        click.echo(f"{key:44s} {rank:5d} {r['safety_finetuned']:9.3f} {r['safety_merged']:10.3f} {r['drift_merged']:9.3f}")
    n = len(rows)
    mean = lambda f: sum(r[f] for r in rows.values()) / n  # noqa: E731
    click.echo(
        f"\nPlanted safety delta present (aligned = 1.00): fine-tune {mean('safety_finetuned'):.3f}"
        f" -> LSSF output {mean('safety_merged'):.3f}; task drift kept {mean('drift_merged'):.3f}"
        f" (mean over {n} fused tensors)."
    )
    unchanged = [k for k in finetuned if k not in rows and not torch.equal(finetuned[k].to(merged_state[k].dtype), merged_state[k])]
    click.echo(f"Tensors that are not fused and differ from the fine-tune: {len(unchanged)}")
    return rows
