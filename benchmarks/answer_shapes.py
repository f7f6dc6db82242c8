"""What the answers behind a refusal rate look like, for models of one testbed cell.

    python benchmarks/answer_shapes.py --out testbed/ --cell attack --model finetuned --model lssf-alpha2 [--examples 3]

Reads the evaluations the testbed cached (``DIR/.../eval/NAME.json``, every greedy
answer with the keyword detector's verdict); builds and evaluates nothing. Prints a
markdown table: per model and prompt set (HarmBench ``test``, StrongREJECT, the benign
over-refusal prompts), the mean answer length in words, the empty answers, the answers
the detector calls refusals, how many of those are fragments (at most ``--fragment``
words: a refusal marker in a broken answer, not a refusal a reader would recognise) and
the refusals' most common opening. RESULTS uses it to check whether a refusal rate is
made of real refusals.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lssf_testbed.settings import CELLS, eval_path, model_path  # noqa: E402

SETS = (("harmful", "HarmBench"), ("strongreject", "StrongREJECT"), ("benign", "benign"))


def shape(answers: List[Dict], fragment: int) -> Dict:
    """Length, empty, refusal and fragment counts of one prompt set's ``answers``
    (``{"prompt", "response", "refused"}`` records of ``mergekit_lssf.evaluate``)."""
    refused = [a["response"].strip() for a in answers if a["refused"]]
    openings = collections.Counter(" ".join(r.split()[:3]) for r in refused)
    return {
        "n": len(answers),
        "mean_words": sum(len(a["response"].split()) for a in answers) / max(len(answers), 1),
        "empty": sum(not a["response"].strip() for a in answers),
        "refused": len(refused),
        "fragments": sum(len(r.split()) <= fragment for r in refused),
        "opening": openings.most_common(1)[0][0] if refused else "",
    }


def main(argv=None) -> Dict[str, Dict[str, Dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the testbed's run folder")
    parser.add_argument("--cell", default="main", choices=sorted(CELLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", required=True, help="model names (repeatable)")
    parser.add_argument("--fragment", type=int, default=5, help="a refusal of at most this many words is a fragment")
    parser.add_argument("--examples", type=int, default=0, help="also print this many refused answers per model and set")
    args = parser.parse_args(argv)
    cell, answers, table = CELLS[args.cell], {}, {}
    for name in args.model:
        path = eval_path(model_path(args.out, cell, args.seed, name))
        if not os.path.exists(path):
            sys.exit(f"answer_shapes: model {name!r} of cell {args.cell} seed {args.seed} is not evaluated: {path}")
        with open(path, encoding="utf-8") as fp:
            answers[name] = json.load(fp)["responses"]
        table[name] = {key: shape(answers[name][key], args.fragment) for key, _ in SETS if key in answers[name]}
    print("| model | prompts | mean words | empty | refused | of them fragments | refusals' usual opening |")
    print("|---|---|---|---|---|---|---|")
    for name, sets in table.items():
        for key, label in SETS:
            if key in sets:
                s = sets[key]
                print(f"| {name} | {label} ({s['n']}) | {s['mean_words']:.1f} | {s['empty']} | {s['refused']} | "
                      f"{s['fragments']} | {json.dumps(s['opening'])} |")
    for name in table if args.examples else ():
        for key, label in SETS:
            for a in [a for a in answers[name].get(key, []) if a["refused"]][: args.examples]:
                print(f"{name}, {label}: {json.dumps(a['response'])}")
    return table


if __name__ == "__main__":
    main()
