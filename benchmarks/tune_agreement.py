"""Does ``mergekit-lssf tune`` measure what the testbed measures? (issue 48's agreement check)

    python benchmarks/tune_agreement.py --testbed testbed/ --out tune-agreement/

Runs, as a user would, on the testbed's main cell, seed 0 (built by ``python
benchmarks/safety_testbed.py --out testbed/ --cell main``)::

    mergekit-lssf tune OUT/recipe.yml --task OUT/task.jsonl --out OUT/tune \\
        --families interpolation --grid interpolation=0.25,0.5 --max-prompts 72 \\
        --batch-size 24 --max-new-tokens 32

``recipe.yml`` is the lssf recipe of the cell's models (fine-tune as base, its aligned
and unaligned models), ``task.jsonl`` the testbed's task ``test`` rows (the rows its
utility is measured on; the folder must be built with the default settings). Then each tune point ``interpolation`` at ``l`` is set beside
the testbed's own evaluation of ``interpolate-{l}`` (``eval/interpolate-{l}.json``):
HarmBench-test refusal (same 72 prompts, greedy, the testbed's new tokens and batch
size passed explicitly, the same detector, the same torch thread count as the testbed's
run when run on the same machine: the rates and every prompt's verdict must be
identical) and utility kept
(``measure.utility_kept`` from each side's own task NLL of the fine-tune, the aligned
model and the point: must agree within 0.01). Prints a table and writes
``OUT/agreement.json``; exits 1 when they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LEVELS = (0.25, 0.5)
UTILITY_TOLERANCE = 0.01


def check_testbed(testbed: str) -> None:
    """The testbed folder was built with the default ``Settings`` (its ``digests.json``),
    so the task rows written here are the ones its utility was measured on."""
    from lssf_testbed.settings import Settings, settings_digest

    with open(os.path.join(testbed, "digests.json"), encoding="utf-8") as fp:
        built = json.load(fp).get("main")
    if built != settings_digest(Settings(), "main"):
        raise SystemExit(f"--testbed {testbed}: its main cell was built with other settings ({built}); the check needs "
                         "the default ones")


def write_inputs(testbed: str, out: str) -> tuple[str, str]:
    """``(recipe.yml, task.jsonl)`` in ``out`` for the testbed's main cell, seed 0."""
    from lssf_testbed.data import PromptSets
    from lssf_testbed.settings import Settings

    models = os.path.abspath(os.path.join(testbed, "models"))
    recipe = {"merge_method": "lssf", "base_model": os.path.join(models, "finetuned"), "dtype": "float32",
              "out_dtype": "bfloat16", "parameters": {"round_to": "bfloat16"},
              "models": [{"model": os.path.join(models, "aligned"), "parameters": {"role": "aligned"}},
                         {"model": os.path.join(models, "unaligned"), "parameters": {"role": "unaligned"}}]}
    os.makedirs(out, exist_ok=True)
    recipe_path, task_path = os.path.join(out, "recipe.yml"), os.path.join(out, "task.jsonl")
    with open(recipe_path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp)
    with open(task_path, "w", encoding="utf-8") as fp:
        for row in PromptSets(Settings(), strongreject=False).task_test:
            fp.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    return recipe_path, task_path


def compare(testbed: str, record: dict) -> dict:
    """Each level's figures from tune (``record``: tune.json) and from the testbed's
    evaluations, and whether they agree (module doc)."""
    from mergekit_lssf.measure import utility_kept

    def evaluation(name):
        with open(os.path.join(testbed, "eval", f"{name}.json"), encoding="utf-8") as fp:
            return json.load(fp)

    bed_ft, bed_al = evaluation("finetuned"), evaluation("aligned")
    refs = record["references"]
    if len(bed_ft["task_rows"]) != len(refs["finetuned"]["task_rows"]):
        raise SystemExit(f"the testbed measured {len(bed_ft['task_rows'])} task rows, tune "
                         f"{len(refs['finetuned']['task_rows'])}: not the same rows")
    rows = []
    for level in LEVELS:
        point = next(p for p in record["points"] if p["family"] == "interpolation" and abs(p["value"] - level) < 1e-12)
        bed = evaluation(f"interpolate-{level:g}")
        bed_flags = [int(r["refused"]) for r in bed["responses"]["harmful"]]
        tune_flags = list(point["refused"]["harmbench"])
        row = {"l": level,
               "refusal_tune": point["refusal"]["harmbench"], "refusal_testbed": bed["refusal_rate"],
               "prompts_tune": len(tune_flags), "prompts_testbed": len(bed_flags),
               "verdicts_differ": sum(a != b for a, b in zip(tune_flags, bed_flags)) + abs(len(tune_flags) - len(bed_flags)),
               "utility_tune": utility_kept(point["task_nll"], refs["aligned"]["task_nll"], refs["finetuned"]["task_nll"]),
               "utility_testbed": utility_kept(bed["task_nll"], bed_al["task_nll"], bed_ft["task_nll"])}
        row["refusal_identical"] = row["verdicts_differ"] == 0 and row["refusal_tune"] == row["refusal_testbed"]
        row["utility_within"] = abs(row["utility_tune"] - row["utility_testbed"]) <= UTILITY_TOLERANCE
        rows.append(row)
    return {"levels": rows, "agree": all(r["refusal_identical"] and r["utility_within"] for r in rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", required=True, help="the testbed folder (main cell, seed 0, with eval/)")
    parser.add_argument("--out", required=True, help="where the recipe, the task rows and tune's folder go")
    args = parser.parse_args(argv)
    for name in ("finetuned", "aligned", *(f"interpolate-{level:g}" for level in LEVELS)):
        if not os.path.exists(os.path.join(args.testbed, "eval", f"{name}.json")):
            parser.error(f"--testbed {args.testbed}: no eval/{name}.json (build the main cell first)")
    check_testbed(args.testbed)
    from lssf_testbed.settings import Settings

    recipe, task = write_inputs(args.testbed, args.out)
    tune_dir = os.path.join(args.out, "tune")
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-lssf"), "tune", recipe, "--task", task, "--out",
               tune_dir, "--families", "interpolation", "--grid", "interpolation=" + ",".join(f"{v:g}" for v in LEVELS),
               "--max-prompts", "72", "--batch-size", str(Settings().eval_batch),
               "--max-new-tokens", str(Settings().max_new_tokens)]
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    with open(os.path.join(tune_dir, "tune.json"), encoding="utf-8") as fp:
        result = compare(args.testbed, json.load(fp))
    import torch

    result["tune_seconds"] = round(seconds, 1)
    result["torch_threads"] = torch.get_num_threads()  # tune's child process has the same default
    with open(os.path.join(args.out, "agreement.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=2)
    print("| l | refusal tune | refusal testbed | verdicts differ | utility kept tune | utility kept testbed |")
    print("|---|---|---|---|---|---|")
    for r in result["levels"]:
        print(f"| {r['l']:g} | {r['refusal_tune']:.4f} | {r['refusal_testbed']:.4f} | {r['verdicts_differ']} of "
              f"{r['prompts_testbed']} | {r['utility_tune']:.4f} | {r['utility_testbed']:.4f} |")
    print("agree" if result["agree"] else "DISAGREE", f"({seconds:.0f} s of tune)")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
