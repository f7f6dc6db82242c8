"""Does the recipe.yml that ``mergekit-lssf tune`` writes give the figures tune.json reports?

    python benchmarks/tune_reproduce.py --tune TUNE_DIR --out DIR
    python benchmarks/tune_reproduce.py --tune TUNE_DIR --out DIR --point "lssf alpha=1"   # any measured point

Merges ``TUNE_DIR/recipe.yml`` with plain ``mergekit-yaml`` (as a user would: ``mergekit-yaml
recipe.yml DIR/merged``), loads the merged model as tune loads a model, and measures it
with the package's ``evaluate.measure_model`` on exactly tune's sets (the HarmBench
``test`` prompts and the benign ``test`` prompts, each ``evenly_spaced`` to tune.json's
``max_prompts``; the task rows tune measured, from its ``task_file`` and
``measurement_rows``), at tune.json's batch size, new tokens and device, with this
process's torch threads (run it with the thread count tune ran with). Tune's chosen point
(or ``--point KEY``: that point, its recipe as tune.json stores it) must come out the same: every prompt's refusal verdict, the empty rates, over-refusal and
the task NLL identical (the weights are bit-identical, so the float32 forward is too).
Writes ``DIR/reproduce.json``; exits 1 when any figure differs. Run it from the folder
tune ran in: the recipe's model paths and tune.json's ``task_file`` are read as given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

KEYS = ("refused", "empty", "over_refusal", "task_nll", "perplexity")


def measure_like_tune(model_dir: str, record: dict) -> dict:
    """``measure_model`` of ``model_dir`` on tune.json ``record``'s own sets and settings."""
    from mergekit_lssf import evaluate as ev
    from mergekit_lssf.contrastive_calibrate import load_task
    from mergekit_lssf.evaluate import measure_model
    from mergekit_lssf.generation import load_model
    from mergekit_lssf.measure import evenly_spaced
    from mergekit_lssf.tune import harmful_sets

    s = record["settings"]
    rows = [{"prompt": r.prompt, "answer": r.response} for r in load_task(record["task_file"])]
    model, tokenizer = load_model(model_dir, s["device"])
    return measure_model(model, tokenizer, harmful=harmful_sets(s["max_prompts"]),
                         benign=evenly_spaced(ev.benign_prompts("test"), s["max_prompts"]), text=ev.benign_text(),
                         rows=[rows[i] for i in s["measurement_rows"]], max_new_tokens=s["max_new_tokens"],
                         batch_size=s["batch_size"], progress=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", required=True, help="a folder tune wrote, with recipe.yml")
    parser.add_argument("--out", required=True, help="where the merged model and reproduce.json go")
    parser.add_argument("--point", help="a point's key in tune.json (default: the chosen one, from recipe.yml)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.tune, "tune.json"), encoding="utf-8") as fp:
        record = json.load(fp)
    recipe = os.path.join(args.tune, "recipe.yml")
    if args.point is not None:
        keys = [p["key"] for p in record["points"]]
        if args.point not in keys:
            parser.error(f"--point {args.point!r}: tune.json has {', '.join(keys)}")
        os.makedirs(args.out, exist_ok=True)
        recipe = os.path.join(args.out, "recipe.yml")
        with open(recipe, "w", encoding="utf-8") as fp:
            fp.write(next(p for p in record["points"] if p["key"] == args.point)["recipe"])
    elif not os.path.exists(recipe):
        parser.error(f"--tune {args.tune}: no recipe.yml there (tune chose no point); name one with --point")
    merged = os.path.join(args.out, "merged")
    import torch

    subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), recipe, merged], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    got = measure_like_tune(merged, record)
    point = next(p for p in record["points"] if p["key"] == (args.point or record["chosen"]["key"]))
    rows = {k: {"tune": point[k], "merged": got[k], "identical": point[k] == got[k]} for k in KEYS}
    result = {"chosen": point["key"], "figures": rows, "identical": all(r["identical"] for r in rows.values())}
    with open(os.path.join(args.out, "reproduce.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=2)
    for k, r in rows.items():
        shown = (lambda v: json.dumps(v)[:60])
        print(f"{k}: tune {shown(r['tune'])} merged {shown(r['merged'])} {'identical' if r['identical'] else 'DIFFERENT'}")
    print(f"{point['key']}: recipe.yml " + ("reproduces tune.json" if result["identical"] else "does NOT reproduce tune.json"))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
