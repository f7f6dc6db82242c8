"""Two cells of one published testbed folder, model by model, at one drift seed.

    python benchmarks/cell_contrast.py --published benchmarks/testbed-v4-dtype --cell main-float32 --against main

Prints a markdown table: per model both cells have, the refusal rate in each cell on
HarmBench and StrongREJECT, the paired difference (cell minus the other, the same
prompts resampled for both: ``verdicts.paired_contrast``) with its 95% bootstrap
interval, and the utility kept and empty-answer rate in each. Meant for cells that
differ in one factor and share their prompts (``main-float32`` against a ``main`` build
of the same folder: the dtype effect). Utility kept is each cell's own (against its own
aligned and fine-tuned models), so it compares how much of the task each repair keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.report import RATE_COLUMNS, run_file, with_derived  # noqa: E402
from lssf_testbed.settings import CELLS  # noqa: E402
from lssf_testbed.verdicts import PROMPT_SETS, load, paired_contrast  # noqa: E402


def _run_table(path: str) -> Dict[str, Dict[str, float]]:
    """The model table of the published run at ``path``, derived columns added."""
    with open(path) as fp:
        return with_derived(json.load(fp))


def contrast_rows(published: str, cell: str, against: str, seed: int) -> List[Dict]:
    """Per model of both cells' runs (``published/runs/CELL-seedK.json`` and their
    ``verdicts/``), in ``cell``'s order: ``model``, per prompt set ``rate_SET`` (cell,
    against), ``contrast_SET`` (``paired_contrast`` of cell minus against), and
    ``utility_kept`` and ``empty_rate`` (cell, against). SystemExit naming the missing
    file when a run or its verdicts are not published there."""
    found: Dict[str, Dict] = {"runs": {}, "verdicts": {}}
    for name in (cell, against):
        for kind, reader in (("runs", _run_table), ("verdicts", load)):
            path = os.path.join(published, kind, run_file(name, seed))
            if not os.path.exists(path):
                sys.exit(f"cell_contrast: cell {name} seed {seed} is not published in {published}: no {kind}/{run_file(name, seed)}")
            found[kind][name] = reader(path)
    runs, verdicts = found["runs"], found["verdicts"]
    rows = []
    for model in [m for m in runs[cell] if m in runs[against] and m in verdicts[cell] and m in verdicts[against]]:
        both = {"a": verdicts[cell][model], "b": verdicts[against][model]}
        row = {"model": model}
        for key, column in RATE_COLUMNS:
            row["rate_" + key] = (runs[cell][model].get(column), runs[against][model].get(column))
            row["contrast_" + key] = paired_contrast([both], "a", "b", key)
        for column in ("utility_kept", "empty_rate"):
            row[column] = (runs[cell][model].get(column), runs[against][model].get(column))
        rows.append(row)
    return rows


def _pair(values, digits: int = 2) -> str:
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", required=True, help="a folder the testbed's --report-only --publish wrote")
    parser.add_argument("--cell", required=True, choices=sorted(CELLS))
    parser.add_argument("--against", required=True, choices=sorted(CELLS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = contrast_rows(args.published, args.cell, args.against, args.seed)
    labels = [label for _, label in PROMPT_SETS]
    print("| model | " + " | ".join(f"{label} refusal ({args.cell} / {args.against}) | difference [95%]" for label in labels)
          + f" | utility kept ({args.cell} / {args.against}) | HarmBench empty |")
    print("|---" * (2 * len(labels) + 3) + "|")
    for r in rows:
        cells = []
        for key, _ in PROMPT_SETS:
            c = r["contrast_" + key]
            cells += [_pair(r["rate_" + key]), "-" if c is None else f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"]
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {_pair(r['utility_kept'], 3)} | {_pair(r['empty_rate'])} |")
    return rows


if __name__ == "__main__":
    main()
