"""The ``mergekit-lssf`` command: wires the subcommands to their modules.

Every problem we detect (``LSSFConfigError``) ends the command with one line on
stderr and exit status 1; ``-v``/``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click
import torch

from mergekit_lssf import evaluate as ev
from mergekit_lssf.calibrate import calibrate as run_calibration
from mergekit_lssf.check import check as run_check, table
from mergekit_lssf.contrastive_calibrate import check_options, contrastive_calibrate, load_task, recipe_models
from mergekit_lssf.demo import run_demo
from mergekit_lssf.guards import check_model_folder, check_output_folder
from mergekit_lssf.multi_recipe import check_documents, documents_table, is_multi_document
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.patch import OUTPUTS as PATCH_OUTPUTS, extract_patch
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.provenance import versions
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.report import OUTPUTS as REPORT_OUTPUTS, build_report
from mergekit_lssf.tune import TuneOptions, parse_grids, tune as run_tune

DEVICES = click.Choice(["auto", "cpu", "cuda"])


def _versions(ctx, _param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    v = versions()
    click.echo(f"mergekit-lssf {v.pop('mergekit-lssf')} (" + ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
    ctx.exit()


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LSSFConfigError as error:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"mergekit-lssf: error: {error}", err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.option("--version", is_flag=True, callback=_versions, expose_value=False, is_eager=True,
              help="Show the version of mergekit-lssf, mergekit, torch and transformers.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def main(ctx, verbose: bool) -> None:
    """LSSF (Low-Rank Safety Subspace Fusion) for mergekit.

    The merge itself is a plain `mergekit-yaml recipe.yml out/` with
    `merge_method: lssf`; these commands are helpers around it.
    """
    ctx.obj = {"verbose": verbose}


def _device(device: str, cuda: bool) -> str:
    """--device, with the older --cuda flag as an alias for --device cuda."""
    if cuda:
        if device not in ("auto", "cuda"):
            raise click.UsageError(f"--cuda contradicts --device {device}")
        return "cuda"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@main.command()
@click.option("--workdir", default="lssf-demo", show_default=True, help="Where the toy models and the merged output go.")
@click.option("--size", type=click.Choice(["tiny", "small", "10m", "50m", "200m"]), default="small", show_default=True, help="Toy model size.")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where mergekit-yaml computes (auto: cuda when there is one; cuda: --cuda).")
@click.option("--cuda", is_flag=True, help="Alias for --device cuda.")
@click.option("--calibrated", is_flag=True, help="Calibrate the subspace on anchors first (mergekit_lssf/recipes/demo-calibrated.yml).")
def demo(workdir: str, size: str, device: str, cuda: bool, calibrated: bool) -> None:
    """Build three small Llama-shaped models and repair the fine-tune with LSSF.

    No downloads: the models are generated locally, with a planted low-rank
    safety delta that the fine-tune erased. Runs `mergekit-yaml` on the demo
    recipe and prints the rank per tensor and how much of the planted safety
    delta the output restored.
    """
    run_demo(workdir, size, _device(device, cuda), calibrated)


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def check(recipe: str, as_json: bool) -> None:
    """What RECIPE will do, before any spectrum: every output tensor, fused (with its
    effective parameters after filters and gradients) or kept (and why).

    Runs the merge's own pre-flight check and reads only file headers, so it takes
    seconds whatever the model size. Model paths are resolved from the current directory.
    A multi-document recipe (mergekit-multi) is checked document by document.
    """
    if is_multi_document(recipe):  # issue 49 finding 10
        result = check_documents(recipe, lambda config: run_check(plan_recipe(config, needs_weights=False)))
        click.echo(json.dumps(result, indent=2) if as_json else documents_table(result, table))
        return
    result = run_check(plan_recipe(load_recipe(recipe), needs_weights=False))
    click.echo(json.dumps(result, indent=2) if as_json else table(result))


@main.command()
@click.argument("source", metavar="ALIGNED_MODEL|RECIPE", type=click.Path(exists=True))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The file to write (.safetensors).")
@click.option("--task", "task_path", type=click.Path(dir_okay=False),
              help='RECIPE only: JSONL of {"prompt": ..., "answer": ...}, the fine-tune\'s task rows; without it, the '
                   "shipped benign prompts answered by the fine-tune (benign-only).")
@click.option("--anchors", type=click.Path(exists=True, dir_okay=False), help='JSONL of {"prompt": ..., "response": ...}; default: 128 shipped HarmBench prompts.')
@click.option("--max-rank", default="256", show_default=True,
              help="Vectors kept per weight (Eq. 4: columns of U) or per input site (RECIPE; `full` keeps all).")
@click.option("--eps", default=1e-6, show_default=True, type=float, help="RECIPE only: ridge added to the trace-normalised task Gram.")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where the model runs (auto: cuda when there is one).")
@click.option("--batch-size", default=8, show_default=True, help="Rows per forward pass.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Length of generated responses for anchors without one.")
@click.option("--lora-merge-cache", type=click.Path(file_okay=False),
              help="RECIPE only: where mergekit merges a model+lora fine-tune (as mergekit-yaml's).")
@click.option("--keep-control", is_flag=True,
              help="RECIPE only: write the study control C_H = I instead of the anchors' Gram (\"roll back every "
                   "direction the task does not use\"), with --max-rank full; not a safety repair.")
def calibrate(source, out_path, task_path, anchors, max_rank, eps, device, batch_size, max_new_tokens,
              lora_merge_cache, keep_control) -> None:
    """Calibrate a subspace from activations. Two forms:

    `calibrate ALIGNED_MODEL --out FILE`: the paper's calibrated safety subspace (Eq. 4)
    of a local HF folder; use it with `subspace: FILE` in an lssf recipe. Anchors
    without a response are answered by the model itself, greedily (its own refusals).

    `calibrate RECIPE --task TASK.jsonl --out FILE`: the contrastive calibration of the
    recipe's fine-tune (`base_model`) against the refusals of its
    `role: aligned` model: input Grams of harmful anchors and of the task rows, through
    the fine-tune, and the generalized eigenvectors of the pair per input site. A
    `BASE+LORA` fine-tune is merged in --lora-merge-cache first, as mergekit-yaml does.
    """
    is_recipe = os.path.isfile(source) and source.endswith((".yml", ".yaml"))
    if max_rank != "full" and not max_rank.isdigit():
        raise click.BadParameter(f"expected a positive integer or `full`, got {max_rank!r}", param_hint="--max-rank")
    if not is_recipe:
        if task_path or max_rank == "full" or lora_merge_cache or keep_control:
            raise click.UsageError("--task, --lora-merge-cache, --keep-control and --max-rank full need a RECIPE (the contrastive "
                                   f"calibration), not the model folder {source}")
        check_model_folder(source, "ALIGNED_MODEL", local=True)
        meta = run_calibration(source, out_path, anchors_path=anchors, max_rank=int(max_rank), device=device,
                               batch_size=batch_size, max_new_tokens=max_new_tokens)
        click.echo(
            f"Wrote {out_path}: {meta['anchors']} anchors, {meta['tokens']} tokens, "
            f"max_rank {meta['max_rank']}, {meta['seconds']} s"
        )
        return
    if keep_control and max_rank != "full":
        raise click.UsageError("--keep-control needs --max-rank full: with C_H = I every direction the task leaves "
                               "unused has the same eigenvalue, so a leading few of them would be an arbitrary pick")
    check_options(out_path, eps, None if max_rank == "full" else int(max_rank), batch_size)  # before a LoRA merge
    task = load_task(task_path) if task_path else None
    roles = recipe_models(load_recipe(source), lora_merge_cache)
    meta = contrastive_calibrate(roles, out_path, task=task, anchors_path=anchors,
                                 max_rank=None if max_rank == "full" else int(max_rank), eps=eps, device=device,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens, keep_control=keep_control,
                                 log=lambda line: click.echo(line, err=True))
    click.echo(
        f"Wrote {out_path} ({meta['task']}{', the C_H = I control' if keep_control else ''}): {meta['anchors']} anchors ({meta['anchor_tokens']} tokens), "
        f"{meta['task_rows']} task rows ({meta['task_tokens']} tokens), {meta['sites_count']} input sites, "
        f"eps {meta['eps']}, {meta['bytes'] / 2**20:.1f} MiB, {meta['seconds']} s, "
        f"peak memory {meta['peak_mib']} MiB; {meta['truncation']}"
    )


@main.command("eval")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--prompts", default="harmbench", show_default=True, help="harmbench (the 72 held-out HarmBench test prompts) or a file: JSONL with \"prompt\", or one prompt per line.")
@click.option("--benign", type=click.Path(exists=True, dir_okay=False), help="Benign prompts for over-refusal (default: 30 shipped everyday instructions).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Plain text for perplexity (default: shipped benign prose).")
@click.option("--max-new-tokens", default=48, show_default=True, help="Length of each greedy answer.")
@click.option("--batch-size", default=16, show_default=True, help="Prompts per generation batch (left-padded; greedy answers can differ slightly with it).")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where the models run (auto: cuda when there is one).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the JSON result (every response with its `refused` flag) here.")
@click.option("--tokenizer", "tokenizer", metavar="PATH", help="Tokenizer (folder or hub id) for a model folder that holds none.")
def eval_command(model_dirs, prompts, benign, text_file, max_new_tokens, batch_size, device, out_path, tokenizer) -> None:
    """Refusal rate on harmful prompts, over-refusal on benign ones, and perplexity,
    for one or more models (MODEL_DIRS), on the same prompts; several models get one
    side-by-side table.

    Greedy generation with each model's chat template; a response is a refusal when
    one of mergekit_lssf.evaluate.REFUSAL_MARKERS opens it (see the README). A folder
    without a tokenizer uses --tokenizer, else, for a model+lora fine-tune that
    mergekit merged in --lora-merge-cache, the tokenizer of the model under the LoRA.
    """
    sources = {}
    for model_dir in model_dirs:
        sources[model_dir] = ev.check_model_dir(model_dir, tokenizer)
        if sources[model_dir] != model_dir:
            click.echo(f"eval: {model_dir} holds no tokenizer; using the one of {sources[model_dir]}", err=True)
    harmful = ev.harmbench_prompts("test") if prompts == "harmbench" else ev.read_prompts(prompts)
    benign_list = ev.read_prompts(benign) if benign else ev.benign_prompts("test")
    text = open(text_file, encoding="utf-8").read() if text_file else ev.benign_text()
    results = [ev.evaluate(m, harmful=harmful, benign=benign_list, text=text, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, device=_device(device, False), tokenizer_source=sources[m])
               for m in model_dirs]
    if out_path:
        with open(out_path, "w", encoding="utf-8") as fp:
            json.dump(results[0] if len(results) == 1 else {"models": results}, fp, indent=2)
    if len(results) == 1:
        r = results[0]
        click.echo(
            f"refusal rate {r['refusal_rate']:.3f} on {r['harmful_prompts']} harmful prompts; "
            f"over-refusal {r['over_refusal_rate']:.3f} on {r['benign_prompts']} benign; "
            f"perplexity {r['perplexity']:.2f}"
        )
    else:
        click.echo(ev.side_by_side(results))


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for report.json, report.csv and the PNGs.")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where the spectra are computed (auto: cuda when there is one).")
@click.option("--cuda", is_flag=True, help="Alias for --device cuda.")
@click.option("--lora-merge-cache", type=click.Path(file_okay=False),
              help="Folder where mergekit merges a model+lora reference into a full model (as mergekit-yaml's).")
def report(recipe: str, out_dir: str, device: str, cuda: bool, lora_merge_cache: Optional[str]) -> None:
    """Rank, entropy and energy of every tensor RECIPE would fuse; writes no model.

    Model paths in RECIPE are resolved from the current directory, as in mergekit-yaml.
    """
    check_output_folder(out_dir, REPORT_OUTPUTS, "a report")
    plan = plan_recipe(load_recipe(recipe), lora_merge_cache=lora_merge_cache)
    result = build_report(plan, out_dir, cuda=_device(device, cuda) == "cuda")
    s = result["summary"]
    click.echo(
        f"{s['tensors']} tensors: rank min {s['rank_min']} / mean {s['rank_mean']:.1f} / "
        f"max {s['rank_max']}, {s['capped']} capped, {s['rank_zero']} at rank 0; patch size "
        f"{s['patch_parameters']:,} parameters. Written to {out_dir}/ ({', '.join(REPORT_OUTPUTS)})"
    )
    if s["sixteen_bit_inputs"]:
        click.echo(
            f"{s['sixteen_bit_inputs']} tensors from 16-bit inputs: signal rank (above the rounding edge) "
            f"mean {s['signal_rank_mean']:.1f}; {s['capped_above_signal']} capped by max_rank at more than "
            "twice their signal rank (the entropy rule measured rounding noise there; see `spectrum: signal`)"
        )


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", "task_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt": ..., "answer": ...}: your task\'s rows (utility is measured on them).')
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for tune.json, tune.png and recipe.yml; a rerun into it resumes.")
@click.option("--budget", default=0.01, show_default=True, type=float,
              help="The share of the task the chosen repair may cost: utility kept >= 1 - BUDGET.")
@click.option("--points", default=5, show_default=True, type=int, help="Points per family (at least 2).")
@click.option("--families", default="lssf,interpolation", show_default=True,
              help="Comma-separated, of lssf, interpolation, contrastive.")
@click.option("--grid", "grids", multiple=True, metavar="FAMILY=V,V,...",
              help="This family's values instead of its default grid (repeatable).")
@click.option("--max-prompts", default=64, show_default=True, type=int,
              help="Cap on each prompt set, evenly spaced as the testbed caps a set (HarmBench test: 72; benign: "
                   "30; 72 reads them all, as the testbed does).")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where the model runs while it is measured (auto: cuda when there is one); the points' weights "
                   "are always computed on the CPU, as plain mergekit-yaml computes them.")
@click.option("--batch-size", default=24, show_default=True, type=int,
              help="Prompts or task rows per batch (left-padded generation: answers can differ slightly with it).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int, help="Length of each greedy answer.")
@click.option("--lora-merge-cache", type=click.Path(file_okay=False),
              help="Where mergekit merges a model+lora fine-tune (as mergekit-yaml's).")
@click.option("--restart", is_flag=True, help="Start afresh in --out, replacing tune's own files there.")
def tune(recipe, task_path, out_dir, budget, points, families, grids, max_prompts, device, batch_size,
         max_new_tokens, lora_merge_cache, restart) -> None:
    """How much refusal RECIPE's repairs win back on your task, at what cost, and the
    recipe to use.

    RECIPE is an lssf recipe whose `base_model` is the fine-tune (`BASE+LORA` too)
    with a `role: aligned` model. Each family is a curve of N = --points repairs,
    built in memory on one copy of the fine-tune (no checkpoint per point), each with
    the weights mergekit-yaml writes for it: lssf (the recipe's own fusion, alpha =
    1/N, 2/N, ..., 1; lam log-spaced from 30 to 0.3 for a contrastive recipe),
    interpolation (mergekit's linear toward the aligned model, l = 0.5/N, ..., 0.5 on
    the aligned model) and contrastive (calibrated on half the task rows, lam
    log-spaced from 30 to 0.3; not run by default). Defaults: lssf and interpolation,
    5 points each.

    Each point, the fine-tune and the aligned model get: refusal on the HarmBench test
    prompts (the package ships no StrongREJECT) and over-refusal on shipped benign prompts (greedy answers of
    --max-new-tokens, default 32, in batches of --batch-size, default 24: the
    testbed's), task NLL on the rows no calibration read, utility kept (1: the
    fine-tune's task NLL, 0: the aligned model's), perplexity on shipped prose. The
    chosen point wins back the most refusal with utility kept >= 1 - BUDGET (ties: the
    lower cost), chosen on half of the harmful prompts and reported on the other half.

    Writes DIR/tune.json (every point, after each one), tune.png and recipe.yml, a
    plain mergekit recipe of the chosen point (none when no point wins anything back).
    A rerun into DIR measures no point twice; Ctrl-C keeps the points measured.
    """
    options = TuneOptions(budget=budget, points=points, families=tuple(f.strip() for f in families.split(",") if f.strip()),
                          grids=parse_grids(grids), max_prompts=max_prompts, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, device=_device(device, False),
                          lora_merge_cache=lora_merge_cache, restart=restart)
    try:
        run_tune(recipe, task_path, out_dir, options, echo=click.echo, warn=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        click.echo(f"mergekit-lssf tune: interrupted; the points measured so far are in {out_dir}/tune.json "
                   "(rerun the same command to go on)", err=True)
        sys.exit(130)


@main.command("extract-patch")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("legacy_out", required=False, metavar="[OUT_DIR]", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the adapter (adapter_config.json, adapter_model.safetensors, README.md).")
@click.option("--device", type=DEVICES, default="auto", show_default=True,
              help="Where the spectra are computed (auto: cuda when there is one).")
@click.option("--cuda", is_flag=True, help="Alias for --device cuda.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the adapter's A and B (float32 keeps the term exactly).")
@click.option("--lora-merge-cache", type=click.Path(file_okay=False),
              help="Folder where mergekit merges a model+lora reference into a full model (as mergekit-yaml's).")
def extract_patch_command(recipe: str, legacy_out: str, out_dir: str, device: str, cuda: bool, dtype: str,
                          lora_merge_cache: Optional[str]) -> None:
    """Write RECIPE's safety term as a PEFT LoRA adapter in --out.

    With `fusion: restore` (the default) the adapter pulls RECIPE's base_model back
    toward the aligned model, so it is for that fine-tune only (PeftModel.from_pretrained,
    or merge_and_unload() for the same weights as mergekit-yaml with RECIPE). With
    `fusion: add` (the paper's) it depends only on the aligned and unaligned models: a
    universal patch for any fine-tune of the aligned model. The positional OUT_DIR
    still works but is deprecated: use --out.
    """
    if legacy_out and out_dir:
        raise click.UsageError("give the output folder once: --out DIR (the positional OUT_DIR is deprecated)")
    if legacy_out:
        click.echo("mergekit-lssf: the positional OUT_DIR of extract-patch is deprecated; use --out DIR", err=True)
        out_dir = legacy_out
    if not out_dir:
        raise click.UsageError("missing option '--out': the folder for the adapter")
    check_output_folder(out_dir, PATCH_OUTPUTS, "an adapter")
    plan = plan_recipe(load_recipe(recipe), lora_merge_cache=lora_merge_cache)
    ranks = extract_patch(plan, out_dir, cuda=_device(device, cuda) == "cuda", dtype=getattr(torch, dtype))
    click.echo(
        f"Safety patch: {len(ranks)} modules, rank {min(ranks.values())}-{max(ranks.values())}, "
        f"written to {out_dir}/"
    )


if __name__ == "__main__":
    main()
