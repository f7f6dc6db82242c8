"""Calibration and extract-patch against model depth and width (CPU or GPU).

    python benchmarks/bench_calibrate.py [--depths 8 24 48] [--anchors 32] [--device cpu|cuda]
    python benchmarks/bench_calibrate.py --width [--anchors 32] [--code CHECKOUT]

Depth (the default): generated Llama-shaped models of one width (hidden 512, intermediate
1376) and 8, 24 or 48 layers. Whole-process wall time and peak RSS of
`mergekit-lssf calibrate` and of `mergekit-lssf extract-patch` (the package defaults,
fusion: restore, a float32 adapter), and of `mergekit-yaml` with task_arithmetic on the
same three models; for the last two also the peak anonymous memory (what the process
holds apart from memory-mapped weights): it must not grow with depth. The weights' size
on disk for comparison.

--width: the time of `mergekit-lssf calibrate` on SmolLM2-135M-Instruct (30 layers,
hidden 576; converted once from its registry package and cached) and on a generated
two-layer model of hidden 4096 (intermediate 11008, Llama-2-7B's layer shapes), best of
two. --code runs the command with the package of another checkout (its folder put first
on PYTHONPATH), for a before/after measurement of the same inputs.

Anchors are HarmBench prompts with a fixed refusal as response (so no generation step,
which loads the whole model).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import BIN, HERE, RECIPES, timed, toy_models  # noqa: E402

from mergekit_lssf.calibrate import default_anchors  # noqa: E402
from mergekit_lssf.real_models import smollm2_135m_instruct  # noqa: E402
from mergekit_lssf.toy_models import count_parameters  # noqa: E402


def anon_peak(command, cwd) -> float:
    """Peak anonymous memory (MiB) of one child process: ``RssAnon`` polled every 20 ms.

    Unlike the peak RSS, it leaves out the file-backed pages of memory-mapped weights
    (mergekit's loaders map every shard), which the kernel reclaims under pressure."""
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as fp:
                for line in fp:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    if child.returncode:
        raise RuntimeError(f"{command[:2]} failed with exit code {child.returncode}")
    return peak / 1024


def calibrate_command(model: str, out: str, anchors: str, device: str):
    return [os.path.join(BIN, "mergekit-lssf"), "calibrate", model, "--out", out, "--anchors", anchors,
            "--device", device]


def bench_depth(depths, anchors, device, workdir):
    """Per depth: calibrate's time and peak RSS; extract-patch's and, on the same three
    models, mergekit-yaml task_arithmetic's time, peak RSS and peak anonymous memory.
    The anonymous memory comes from a second run of each command, so that the polling
    does not run beside the timed one."""
    print("| layers | params | weights MiB (one model) | calibrate s | calibrate peak RSS MiB | "
          "extract-patch s | extract-patch peak RSS / anon MiB | task_arithmetic s | "
          "task_arithmetic peak RSS / anon MiB | adapter MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    lssf = os.path.join(BIN, "mergekit-lssf")
    for depth in depths:
        size = f"w512-l{depth}"
        directory = toy_models(workdir, size)
        weights = os.path.getsize(os.path.join(directory, "aligned", "model.safetensors")) / 2**20
        command = calibrate_command(os.path.join(directory, "aligned"), os.path.join(directory, "subspace.safetensors"),
                                    anchors, device)
        wall, rss = timed(command, directory)
        for method in ("lssf", "task_arithmetic"):
            with open(os.path.join(directory, f"{method}.yml"), "w") as fp:
                yaml.safe_dump(RECIPES[method], fp)
        patch = os.path.join(directory, "patch")
        patch_command = [lssf, "extract-patch", "lssf.yml", "--out", patch, "--device", device]
        merge_command = [os.path.join(BIN, "mergekit-yaml"), "task_arithmetic.yml", "out-task_arithmetic",
                         *(["--cuda"] if device == "cuda" else [])]

        def clear():
            for path in (patch, os.path.join(directory, "out-task_arithmetic")):
                shutil.rmtree(path, ignore_errors=True)

        clear()
        patch_wall, patch_rss = timed(patch_command, directory)
        adapter = os.path.getsize(os.path.join(patch, "adapter_model.safetensors")) / 2**20
        clear()
        patch_anon = anon_peak(patch_command, directory)
        clear()
        merge_wall, merge_rss = timed(merge_command, directory)
        clear()
        merge_anon = anon_peak(merge_command, directory)
        print(f"| {depth} | {count_parameters(size) / 1e6:.0f}M | {weights:.0f} | {wall:.1f} | {rss:.0f} | "
              f"{patch_wall:.1f} | {patch_rss:.0f} / {patch_anon:.0f} | {merge_wall:.1f} | "
              f"{merge_rss:.0f} / {merge_anon:.0f} | {adapter:.0f} |", flush=True)


def bench_width(anchors, device, workdir, code):
    env = {"PYTHONPATH": os.path.abspath(code) + os.pathsep + os.environ.get("PYTHONPATH", "")} if code else None
    models = {"SmolLM2-135M-Instruct": smollm2_135m_instruct(),
              "hidden 4096, 2 layers": os.path.join(toy_models(workdir, "w4096-l2"), "aligned")}
    print(f"package: {os.path.abspath(code) if code else 'this checkout'}")
    print("| model | calibrate s (best of 2) | peak RSS MiB |")
    print("|---|---|---|")
    for label, model in models.items():
        out = os.path.join(workdir, f"subspace-{label.split()[0].lower()}.safetensors")
        runs = [timed(calibrate_command(model, out, anchors, device), workdir, env) for _ in range(2)]
        wall, rss = min(runs)
        print(f"| {label} | {wall:.1f} | {rss:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", nargs="*", type=int, default=[8, 24, 48])
    parser.add_argument("--width", action="store_true", help="calibrate time on SmolLM2 and a 4096-wide model")
    parser.add_argument("--code", help="with --width: a checkout whose package runs the commands")
    parser.add_argument("--anchors", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=os.path.join(HERE, "_work"))
    args = parser.parse_args()
    if args.code and not args.width:
        parser.error("--code goes with --width")

    os.makedirs(args.workdir, exist_ok=True)
    anchors = os.path.join(args.workdir, "anchors.jsonl")
    with open(anchors, "w") as fp:
        for a in default_anchors()[: args.anchors]:
            fp.write(json.dumps({"prompt": a.prompt, "response": "I can't help with that. It could cause serious harm."}) + "\n")
    if args.width:
        bench_width(anchors, args.device, args.workdir, args.code)
    else:
        bench_depth(args.depths, anchors, args.device, args.workdir)


if __name__ == "__main__":
    main()
