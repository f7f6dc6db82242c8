"""Benchmarks: lssf against mergekit's task_arithmetic on the same inputs, same run.

    python benchmarks/bench_merge.py --sizes 10m 50m 200m --repeats 3 [--nearest] [--threads N] [--cuda]
    python benchmarks/bench_merge.py --kernel            # spectral kernel vs float64 SVD
    python benchmarks/bench_merge.py --startup           # cost of the start-up hook

task_arithmetic gets weights [+1, -1] on (aligned, unaligned) with the fine-tune as
base: the same three inputs and the same output as lssf `fusion: add` with eta = 1.
`lssf` is the package defaults (`fusion: restore`), `lssf-add` the paper's fusion.
Wall time and peak RSS are of the whole `mergekit-yaml` process; the best of
--repeats runs.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

import yaml
from mergekit_lssf.parameters import FusionSettings

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)

RECIPES = {
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "./finetuned",
        "models": [
            {"model": "./aligned", "parameters": {"weight": 1.0}},
            {"model": "./unaligned", "parameters": {"weight": -1.0}},
        ],
        "dtype": "bfloat16",
    },
    "lssf": {
        "merge_method": "lssf",
        "base_model": "./finetuned",
        "models": [
            {"model": "./aligned", "parameters": {"role": "aligned"}},
            {"model": "./unaligned", "parameters": {"role": "unaligned"}},
        ],
        "parameters": {"alpha": 1.0, "eta": 0.9},
        "dtype": "bfloat16",
    },
}
RECIPES["lssf-add"] = {**RECIPES["lssf"], "parameters": {**RECIPES["lssf"]["parameters"], "fusion": "add"}}
#: --nearest: the defaults with the plain output cast instead of subspace-preserving rounding
NEAREST = {**RECIPES["lssf"], "parameters": {**RECIPES["lssf"]["parameters"], "rounding": "nearest"}}


def timed(command, cwd, env=None):
    """Wall seconds and peak RSS (MiB) of one child process (``env``: extra variables)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
        "w = time.perf_counter() - t; "
        "sys.exit(r.stderr[-3000:]) if r.returncode else print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], cwd=cwd, capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    wall, rss_kib = out.stdout.split()
    return float(wall), int(rss_kib) / 1024


def toy_models(workdir: str, size: str, dtype: str = "float32") -> str:
    """The folder under ``workdir`` holding ``size``'s aligned, unaligned and finetuned
    toy models (stored in ``dtype``), built on first use."""
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    directory = os.path.join(workdir, size if dtype == "float32" else f"{size}-{dtype}")
    if not os.path.exists(os.path.join(directory, "finetuned", "model.safetensors")):
        print(f"building {size} toy models ({dtype}) ...", flush=True)
        build_toy_models(directory, ToySpec(size=size, dtype=dtype))
    return directory


def bench_merges(sizes, repeats, cuda, workdir, nearest=False, threads=None):
    from mergekit_lssf.toy_models import count_parameters

    rows = []
    for size in sizes:
        directory = toy_models(workdir, size)
        runs = [(m, m, {}) for m in RECIPES]
        if nearest:
            runs.append(("lssf-nearest", "lssf-nearest", {}))
        results = {}
        for _ in range(repeats):
            for label, method, env in runs:  # alternate, so drift hits all
                with open(os.path.join(directory, f"{method}.yml"), "w") as fp:
                    yaml.safe_dump(NEAREST if method == "lssf-nearest" else RECIPES[method], fp)
                # mergekit-lssf refuses to write over a model: clear the last repeat's output
                shutil.rmtree(os.path.join(directory, f"out-{label}"), ignore_errors=True)
                command = [os.path.join(BIN, "mergekit-yaml"), f"{method}.yml", f"out-{label}"]
                command += ["--cuda"] if cuda else []
                command += ["--num-threads", str(threads)] if threads else []
                wall, rss = timed(command, directory, env)
                best = results.get(label, (float("inf"), float("inf")))
                results[label] = (min(best[0], wall), min(best[1], rss))
        ta, ls, add = results["task_arithmetic"], results["lssf"], results["lssf-add"]
        row = (size, count_parameters(size) / 1e6, ta[0], ls[0], ls[0] / ta[0], ta[1], ls[1], ls[1] / ta[1],
               add[0], add[0] / ta[0], add[1] / ta[1])
        line = "| %s | %.1fM | %.2f | %.2f | %.2fx | %.0f | %.0f | %.2fx | %.2f | %.2fx | %.2fx |" % row
        if nearest:
            plain = results["lssf-nearest"]
            row += (plain[0], plain[0] / ta[0])
            line += " %.2f | %.2fx |" % row[-2:]
        rows.append(row)
        print(line, flush=True)
    return rows


def bench_kernel(shapes, svd):
    import torch

    from mergekit_lssf.kernel import lssf_fuse

    torch.manual_seed(0)
    for rows, cols in shapes:
        k = min(rows, cols)
        unaligned = torch.randn(rows, cols) * 0.02
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        sigma = torch.cat([torch.logspace(0, -1, 32), 0.02 * torch.rand(k - 32)]).sort(descending=True).values
        aligned = unaligned + (u * sigma) @ v.T * 0.01
        ft = aligned + torch.randn(rows, cols) * 0.001
        t = time.perf_counter()
        _, info = lssf_fuse(ft, aligned, unaligned, FusionSettings(fusion="add", alpha=1.0, eta=0.9, max_rank=256))
        fast = time.perf_counter() - t
        line = f"| {rows}x{cols} | {fast:.2f} | rank {info.rank} |"
        t = time.perf_counter()
        d = (aligned - unaligned).double()
        torch.linalg.eigh(d @ d.T if rows <= cols else d.T @ d)
        line += f" {time.perf_counter() - t:.2f} |"
        if svd:
            t = time.perf_counter()
            torch.linalg.svd((aligned - unaligned).double(), full_matrices=False)
            full = time.perf_counter() - t
            line += f" {full:.2f} | {full / fast:.1f}x |"
        print(line, flush=True)


def bench_startup():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    hook = [l for l in out.stderr.splitlines() if "mergekit_lssf_startup" in l]
    print("importtime of the start-up hook (self us | cumulative us | module):")
    print("\n".join(hook) or "hook not installed")
    walls = []
    for _ in range(20):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        walls.append(time.perf_counter() - t)
    print(f"python -c pass: median {sorted(walls)[10] * 1000:.1f} ms over 20 runs")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--threads", type=int, help="mergekit's own --num-threads N for every run")
    parser.add_argument("--nearest", action="store_true", help="also time lssf with `rounding: nearest` (the plain output cast)")
    parser.add_argument("--workdir", default=os.path.join(HERE, "_work"))
    parser.add_argument("--kernel", action="store_true")
    parser.add_argument("--kernel-shapes", nargs="*", default=["4096x4096", "1024x4096", "14336x4096"])
    parser.add_argument("--no-svd", action="store_true", help="skip the float64 SVD comparison")
    parser.add_argument("--startup", action="store_true")
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    if args.sizes:
        header = ("| size | params | task_arithmetic s | lssf s | time ratio | task_arithmetic MiB | lssf MiB | RSS ratio |"
                  " lssf-add s | its time ratio | its RSS ratio |")
        header += " lssf, rounding nearest s | its time ratio |" if args.nearest else ""
        print(header)
        bench_merges(args.sizes, args.repeats, args.cuda, args.workdir, args.nearest, args.threads)
    if args.kernel:
        header = "| shape | lssf kernel s | rank | float64 Gram + torch.linalg.eigh s |"
        header += "" if args.no_svd else " float64 full SVD s | speed-up vs SVD |"
        print(header)
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.kernel_shapes]
        bench_kernel(shapes, not args.no_svd)
    if args.startup:
        bench_startup()


if __name__ == "__main__":
    main()
