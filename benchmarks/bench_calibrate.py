"""Calibration time and peak RSS against model depth (memory must not grow with it).

    python benchmarks/bench_calibrate.py [--depths 8 24 48] [--anchors 32] [--device cpu|cuda]

Generated Llama-shaped models of one width (hidden 512, intermediate 1376) and 8, 24
or 48 layers; anchors are HarmBench prompts with a fixed refusal as response (so no
generation step, which loads the whole model). Whole-process wall time and peak RSS
of `mergekit-lssf calibrate`; the weights' size on disk for comparison.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import BIN, HERE, timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", nargs="*", type=int, default=[8, 24, 48])
    parser.add_argument("--anchors", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=os.path.join(HERE, "_work"))
    args = parser.parse_args()

    from mergekit_lssf.calibrate import default_anchors
    from mergekit_lssf.toy_models import ToySpec, build_toy_models, count_parameters

    os.makedirs(args.workdir, exist_ok=True)
    anchors = os.path.join(args.workdir, "anchors.jsonl")
    with open(anchors, "w") as fp:
        for a in default_anchors()[: args.anchors]:
            fp.write(json.dumps({"prompt": a.prompt, "response": "I can't help with that. It could cause serious harm."}) + "\n")
    print("| layers | params | weights MiB | calibrate s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for depth in args.depths:
        size = f"w512-l{depth}"
        directory = os.path.join(args.workdir, size)
        if not os.path.exists(os.path.join(directory, "aligned", "model.safetensors")):
            build_toy_models(directory, ToySpec(size=size))
        weights = os.path.getsize(os.path.join(directory, "aligned", "model.safetensors")) / 2**20
        command = [os.path.join(BIN, "mergekit-lssf"), "calibrate", os.path.join(directory, "aligned"),
                   "--out", os.path.join(directory, "subspace.safetensors"), "--anchors", anchors,
                   "--device", args.device]
        wall, rss = timed(command, directory)
        print(f"| {depth} | {count_parameters(size) / 1e6:.0f}M | {weights:.0f} | {wall:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
