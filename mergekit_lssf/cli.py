"""The ``mergekit-lssf`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from typing import Dict

import click


@click.group()
@click.version_option(package_name="mergekit-lssf")
def main() -> None:
    """LSSF (Low-Rank Safety Subspace Fusion) for mergekit.

    The merge itself is a plain `mergekit-yaml recipe.yml out/` with
    `merge_method: lssf`; these commands are helpers around it.
    """


def demo_recipe_text(name: str = "demo.yml") -> str:
    """The packaged demo recipe ``mergekit_lssf/recipes/NAME`` (in every install kind)."""
    return resources.files("mergekit_lssf").joinpath("recipes", name).read_text("utf-8")


@main.command()
@click.option("--workdir", default="lssf-demo", show_default=True, help="Where the toy models and the merged output go.")
@click.option("--size", default="small", show_default=True, help="Toy model size: tiny, small, 10m, 50m, 200m.")
@click.option("--cuda", is_flag=True, help="Pass --cuda to mergekit-yaml.")
@click.option("--calibrated", is_flag=True, help="Calibrate the subspace on anchors first (mergekit_lssf/recipes/demo-calibrated.yml).")
def demo(workdir: str, size: str, cuda: bool, calibrated: bool) -> None:
    """Build three small Llama-shaped models and repair the fine-tune with LSSF.

    No downloads: the models are generated locally, with a planted low-rank
    safety delta that the fine-tune erased. Runs `mergekit-yaml` on the demo
    recipe and prints the rank per tensor and how much of the planted safety
    delta the output restored.
    """
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    os.makedirs(workdir, exist_ok=True)
    click.echo(f"Building toy models ({size}) in {workdir}/ ...")
    build_toy_models(workdir, ToySpec(size=size))
    name = "demo-calibrated.yml" if calibrated else "demo.yml"
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as fp:
        fp.write(demo_recipe_text(name))
    if calibrated:
        _demo_calibration(workdir, cuda)
    command = [_mergekit_yaml(), name, "merged"] + (["--cuda"] if cuda else [])
    click.echo(f"Running in {workdir}/: " + " ".join(command))
    result = subprocess.run(command, cwd=workdir)
    if result.returncode != 0:
        raise click.ClickException(f"mergekit-yaml failed with exit code {result.returncode}")
    report_restoration(workdir, os.path.join(workdir, "merged"), name)
    if calibrated:
        click.echo(
            "Note: the toy models' planted delta is random, not tied to activations, so a "
            "calibrated subspace restores only the part of it that the anchors' activations "
            "reach; on real models that part is the point (paper Eq. 4)."
        )


def _demo_calibration(workdir: str, cuda: bool) -> None:
    import json

    from mergekit_lssf.calibrate import calibrate as run, default_anchors

    anchors = os.path.join(workdir, "anchors.jsonl")
    with open(anchors, "w", encoding="utf-8") as fp:
        for a in default_anchors()[:16]:
            fp.write(json.dumps({"prompt": a.prompt, "response": "I can't help with that."}) + "\n")
    click.echo("Calibrating the safety subspace of ./aligned on 16 HarmBench anchors ...")
    meta = run(os.path.join(workdir, "aligned"), os.path.join(workdir, "subspace.safetensors"),
               anchors_path=anchors, device="cuda" if cuda else "cpu", progress=False)
    click.echo(f"  {meta['tokens']} tokens, {meta['seconds']} s -> subspace.safetensors")


@main.command()
@click.argument("aligned_model", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The subspace file to write (.safetensors).")
@click.option("--anchors", type=click.Path(exists=True, dir_okay=False), help='JSONL of {"prompt": ..., "response": ...}; default: 128 shipped HarmBench prompts.')
@click.option("--max-rank", default=256, show_default=True, help="Columns of U kept per weight (all singular values are kept).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Anchors per forward pass.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Length of generated responses for anchors without one.")
def calibrate(aligned_model, out_path, anchors, max_rank, device, batch_size, max_new_tokens) -> None:
    """Calibrated safety subspace of ALIGNED_MODEL (a local HF folder), paper Eq. 4.

    Anchors without a response are answered by the model itself, greedily (its own
    refusals). The file serves every fine-tune of ALIGNED_MODEL: use it with
    `subspace: FILE` in an lssf recipe.
    """
    from mergekit_lssf.calibrate import calibrate as run

    meta = run(aligned_model, out_path, anchors_path=anchors, max_rank=max_rank, device=device,
               batch_size=batch_size, max_new_tokens=max_new_tokens)
    click.echo(
        f"Wrote {out_path}: {meta['anchors']} anchors, {meta['tokens']} tokens, "
        f"max_rank {meta['max_rank']}, {meta['seconds']} s"
    )


@main.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", default="harmbench", show_default=True, help="harmbench (the 72 held-out HarmBench test prompts) or a file: JSONL with \"prompt\", or one prompt per line.")
@click.option("--benign", type=click.Path(exists=True, dir_okay=False), help="Benign prompts for over-refusal (default: 30 shipped everyday instructions).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Plain text for perplexity (default: shipped benign prose).")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the JSON result (with every response) here.")
def eval_command(model_dir, prompts, benign, text_file, max_new_tokens, batch_size, device, out_path) -> None:
    """Refusal rate on harmful prompts, over-refusal on benign ones, and perplexity.

    Greedy generation with MODEL_DIR's chat template; a response is a refusal when
    one of mergekit_lssf.evaluate.REFUSAL_MARKERS opens it (see the README).
    """
    import json

    from mergekit_lssf import evaluate as ev

    harmful = ev.harmbench_prompts("test") if prompts == "harmbench" else ev.read_prompts(prompts)
    benign_list = ev.read_prompts(benign) if benign else ev.benign_prompts("test")
    text = open(text_file, encoding="utf-8").read() if text_file else ev.benign_text()
    result = ev.evaluate(model_dir, harmful=harmful, benign=benign_list, text=text,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as fp:
            json.dump(result, fp, indent=2)
    click.echo(
        f"refusal rate {result['refusal_rate']:.3f} on {result['harmful_prompts']} harmful prompts; "
        f"over-refusal {result['over_refusal_rate']:.3f} on {result['benign_prompts']} benign; "
        f"perplexity {result['perplexity']:.2f}"
    )


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for report.json, report.csv and the PNGs.")
@click.option("--cuda", is_flag=True, help="Compute the spectra on the GPU.")
def report(recipe: str, out_dir: str, cuda: bool) -> None:
    """Rank, entropy and energy of every tensor RECIPE would fuse; writes no model.

    Model paths in RECIPE are resolved from the current directory, as in mergekit-yaml.
    """
    from mergekit_lssf.report import build_report
    from mergekit_lssf.traversal import load_recipe

    result = build_report(load_recipe(recipe), out_dir, cuda=cuda)
    s = result["summary"]
    click.echo(
        f"{s['tensors']} tensors: rank min {s['rank_min']} / mean {s['rank_mean']:.1f} / "
        f"max {s['rank_max']}, {s['capped']} capped; patch size {s['patch_parameters']:,} "
        f"parameters. Written to {out_dir}/ (report.json, report.csv, rank_heatmap.png, "
        "entropy_curves.png)"
    )


@main.command("extract-patch")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("legacy_out", required=False, metavar="[OUT_DIR]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the adapter (adapter_config.json, adapter_model.safetensors, README.md).")
@click.option("--cuda", is_flag=True, help="Compute the spectra on the GPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
def extract_patch_command(recipe: str, legacy_out: str, out_dir: str, cuda: bool, dtype: str) -> None:
    """Write RECIPE's safety term as a PEFT LoRA adapter in --out.

    With `fusion: add` (the default) the adapter depends only on the aligned and
    unaligned models: apply it to any fine-tune of the aligned model with
    PeftModel.from_pretrained (unmerged, or merge_and_unload() for the same weights as
    mergekit-yaml with RECIPE). With `fusion: restore` it is for RECIPE's base_model
    only. The positional OUT_DIR still works but is deprecated: use --out.
    """
    import torch

    from mergekit_lssf.patch import extract_patch
    from mergekit_lssf.traversal import load_recipe

    if legacy_out and out_dir:
        raise click.UsageError("give the output folder once: --out DIR (the positional OUT_DIR is deprecated)")
    if legacy_out:
        click.echo("mergekit-lssf: the positional OUT_DIR of extract-patch is deprecated; use --out DIR", err=True)
        out_dir = legacy_out
    if not out_dir:
        raise click.UsageError("missing option '--out': the folder for the adapter")
    ranks = extract_patch(load_recipe(recipe), out_dir, cuda=cuda, dtype=getattr(torch, dtype))
    click.echo(
        f"Safety patch: {len(ranks)} modules, rank {min(ranks.values())}-{max(ranks.values())}, "
        f"written to {out_dir}/"
    )


def _mergekit_yaml() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return exe if os.path.exists(exe) else "mergekit-yaml"


def _recipe_ranks(workdir: str, recipe: str) -> Dict[str, int]:
    """Rank per fused tensor as the recipe's merge chooses it (its eta, max_rank and
    subspace), via the same traversal as `mergekit-lssf report`."""
    from mergekit_lssf.traversal import fused_factors, load_recipe

    previous = os.getcwd()
    os.chdir(workdir)  # recipe paths are relative to the demo folder
    try:
        config = load_recipe(recipe)
        return {t.name: t.factors.info.rank for t in fused_factors(config, quiet=True)}
    finally:
        os.chdir(previous)


def report_restoration(workdir: str, merged: str, recipe: str) -> Dict[str, Dict[str, float]]:
    """Print, per fused tensor, its rank and the share of the planted delta restored.

    ``safety`` is the coefficient of ``W - W_unaligned`` along the planted safety
    delta ``S`` (aligned model = 1.00); ``drift`` the coefficient along the
    fine-tune's task drift ``D`` (fine-tune = 1.00, so the task is kept).
    """
    import torch
    from safetensors.torch import load_file

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


if __name__ == "__main__":
    main()
