"""How far each repair's added term points along delta, per module, for one testbed cell.

    python benchmarks/control_cosine.py --out testbed/ --cell reference-inverse [--seed 0]
    python benchmarks/control_cosine.py --out testbed/ --cell main --seed 0 --drift-overlap 16 64 256

Prints a markdown table: for ``lssf-restore`` and ``interpolate-0.5`` (or the ``--model``
names), the mean over layers of cos(W_model - W_finetuned, W_aligned - W_reference): how
much of each repair's term points along the safety vector, e.g. whether a random-subspace
control keeps much of it (a high-rank subspace). With ``--drift-overlap R ...``: per
rank r, the share of the fine-tune's drift inside delta's top-r subspace against a
random subspace's (``diagnostics.drift_overlap``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.diagnostics import drift_overlap, term_cosines  # noqa: E402
from lssf_testbed.settings import CELLS, model_path  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the testbed's run folder")
    parser.add_argument("--cell", default="main", choices=sorted(CELLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", default=None, help="repair names (default: lssf-restore, interpolate-0.5)")
    parser.add_argument("--drift-overlap", nargs="+", type=int, metavar="R", help="ranks: print the drift-overlap table instead")
    args = parser.parse_args(argv)
    cell = CELLS[args.cell]
    path = lambda name: model_path(args.out, cell, args.seed, name)  # noqa: E731
    if args.drift_overlap:
        for name in ["aligned", cell.reference_model, "finetuned"]:
            if not os.path.isdir(path(name)):
                sys.exit(f"control_cosine: model {name!r} of cell {args.cell} seed {args.seed} is not built: {path(name)}")
        table = drift_overlap(path("aligned"), path(cell.reference_model), path("finetuned"), args.drift_overlap)
        print("| rank r | drift share in delta's top-r subspace | random r-subspace (expected) |\n|---|---|---|")
        for r, row in table.items():
            print(f"| {r} | {row['lssf']:.3f} | {row['random']:.3f} |")
        return
    models = args.model or ["lssf-restore", "interpolate-0.5"]
    for name in ["aligned", cell.reference_model, "finetuned", *models]:
        if not os.path.isdir(path(name)):
            sys.exit(f"control_cosine: model {name!r} of cell {args.cell} seed {args.seed} is not built: {path(name)}")
    table = dict(zip(models, term_cosines(path("aligned"), path(cell.reference_model), path("finetuned"), [path(m) for m in models])))
    print("| module | " + " | ".join(f"`{m}`" for m in models) + " |\n|---|" + "---|" * len(models))
    for module in table[models[0]]:
        print(f"| {module} | " + " | ".join(f"{table[m].get(module, float('nan')):.2f}" for m in models) + " |")


if __name__ == "__main__":
    main()
