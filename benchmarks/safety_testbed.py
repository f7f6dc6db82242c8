"""Real-model safety testbed v4: on bfloat16 checkpoints, does LSSF repair a fine-tune's
safety better than the simple alternatives, at the same cost in what the fine-tune learned?

    python benchmarks/safety_testbed.py --out testbed/               # every cell and seed (many hours on 2 cores)
    python benchmarks/safety_testbed.py --out testbed/ --cell main   # main cell, seed 0
    python benchmarks/safety_testbed.py --out testbed/ --cell main --seed 1
    python benchmarks/safety_testbed.py --out testbed/ --report-only --ranks 16 64 256   # the rank curves at three points
    python benchmarks/safety_testbed.py --out t/ --tiny              # generated tiny model (smoke test)
    python benchmarks/safety_testbed.py --out testbed/ --report-only --publish benchmarks/testbed-v4
                                     # the report of what is evaluated so far, nothing built; the runs
                                     # published there before (other seeds or cells) are kept and summarised

SmolLM2-135M-Instruct as shipped is ``unaligned``; cells vary one factor at a time
from the main cell (LoRA refusal alignment, pre-alignment reference, benign LoRA
drift that teaches a made-up translation task), every model stored in bfloat16 (the
``main-float32`` cell: float32): see ``lssf_testbed/settings.py`` (CELLS). Every
repair is a curve (``lssf_testbed/curves.py``): interpolation toward the aligned
model, LSSF restore at fixed ranks and its random-subspace control, LSSF add, RESTA
with and without DARE, Safe LoRA. Every stage is cached under DIR and resumable.
Writes DIR/results.json, DIR/results.md and DIR/curves-CELL.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.pipeline import Testbed  # noqa: E402
from lssf_testbed.settings import CELLS, Settings, SettingsMismatch  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for models, caches and results.")
    parser.add_argument("--cell", choices=sorted(CELLS), action="append", help="Build only this cell (repeatable); default: all.")
    parser.add_argument("--seed", type=int, action="append", help="Drift seed (repeatable); default: seed 0 with --cell (every seed with --report-only), else every main seed.")
    parser.add_argument("--tiny", action="store_true", help="Generated tiny model and tiny settings (smoke test).")
    parser.add_argument("--report-only", action="store_true",
                        help="Build and evaluate nothing: rebuild the report from the evaluations cached under --out, naming what is missing.")
    parser.add_argument("--publish", metavar="DEST", help="With --report-only: write the report files to DEST (paths under --out as DIR).")
    parser.add_argument("--ranks", type=int, nargs="+", metavar="R",
                        help="The rank curves' points (default: Settings.ranks). Resuming a built folder with more ranks builds "
                             "the new points alone; with --report-only, the report of these ranks' points only.")
    args = parser.parse_args(argv)
    if args.ranks is not None and min(args.ranks) < 1:
        parser.error(f"--ranks {' '.join(map(str, args.ranks))}: every rank must be a positive integer")
    if args.publish and not args.report_only:
        parser.error("--publish needs --report-only")
    if args.report_only and not os.path.isdir(os.path.join(args.out, "models")):
        parser.error(f"--out {args.out}: no testbed folder there (no models/) to report on")
    if args.tiny:
        from mergekit_lssf.toy_models import ToySpec, build_toy_models

        toy = os.path.join(args.out, "toy")
        if not os.path.exists(os.path.join(toy, "unaligned", "model.safetensors")):
            build_toy_models(toy, ToySpec(size="tiny"))
        settings = Settings.tiny(os.path.join(toy, "unaligned"))
    else:
        settings = Settings()
    if args.ranks is not None:
        settings = dataclasses.replace(settings, ranks=tuple(args.ranks))
    seeds = args.seed if args.seed is not None else ([0] if args.cell else None)
    bed = Testbed(args.out, settings, log=lambda m: print(m, flush=True))
    try:
        if args.report_only:
            summary = bed.report_only(args.cell, args.seed, publish=args.publish)
        else:
            summary = bed.run(args.cell, seeds)
    except SettingsMismatch as error:  # a published run, or a testbed folder, built with other settings
        parser.error(str(error))
    print(open(os.path.join(args.publish or args.out, "results.md")).read())
    print(f"{summary['seconds']} s; per stage: {summary['timings_seconds']}")


if __name__ == "__main__":
    main()
