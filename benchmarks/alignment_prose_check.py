"""The LoRA alignment sweep on record: every candidate scored on the validation splits,
with the held-out validation prose as the perplexity text.

    python benchmarks/alignment_prose_check.py --out testbed/
    python benchmarks/alignment_prose_check.py --out t/ --tiny     # smoke test

The testbed tries ``Settings.align_candidates`` in order and stops at the first that
meets every target on the validation splits, with ``lssf_testbed/validation_prose.txt`` as
the perplexity text. This check scores every candidate (trained once into
``DIR/sweeps/align/NAME``, its metrics cached beside it; both reused when the testbed
made them, ``Testbed.alignment_validation``), so the whole sweep is on record, not only
the candidates the testbed reached.
It chooses nothing: it prints a markdown table and writes
``DIR/sweeps/align-prose/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.pipeline import Testbed  # noqa: E402
from lssf_testbed.settings import Settings  # noqa: E402


def main(argv=None, settings: Settings = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the testbed's run folder")
    parser.add_argument("--tiny", action="store_true", help="tiny settings on the generated model in DIR/toy (smoke test)")
    args = parser.parse_args(argv)
    if settings is None:
        settings = Settings.tiny(os.path.join(args.out, "toy", "unaligned")) if args.tiny else Settings()
    bed = Testbed(args.out, settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    folder = os.path.join(args.out, "sweeps", "align-prose")
    base = bed.alignment_base()
    rows = []
    for i, c in enumerate(settings.align_candidates):
        m, met = bed.alignment_validation(i)
        rows.append({"candidate": i, "setting": c, "validation": m, "perplexity_ratio": m["perplexity"] / base["perplexity"],
                     "targets_met": met})
    result = {"unaligned": base, "candidates": rows}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=2)
    print(f"unaligned: perplexity {base['perplexity']:.2f} on the validation prose\n")
    print("| candidate | setting | refusal | over-refusal | perplexity | ratio | targets met |\n|---|---|---|---|---|---|---|")
    for r in rows:
        m, s = r["validation"], r["setting"]
        setting = f"rank {s['rank']}, lr {s['lr']:g}, {s['epochs']} epochs, replay x{s['benign_repeat']}"
        setting += f", prose x{s['prose']}" if s.get("prose") else ""
        met = ", ".join(k for k, v in r["targets_met"].items() if v) or "none"
        print(f"| {r['candidate']} | {setting} | {m['refusal_rate']:.2f} | {m['over_refusal_rate']:.2f} | {m['perplexity']:.2f} "
              f"| {r['perplexity_ratio']:.3f} | {met} |")
    return result


if __name__ == "__main__":
    main()
