"""Every GPU measurement the project needs, in one command, each step with its own limit.

    python benchmarks/gpu_check.py --out DIR                      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny  # the whole run on toy models (CI)

Steps, in order (a failed or timed-out step is recorded and the next one runs):

1. ``tests``: ``pytest -q -k cuda``, then the kernel and precision tests' independent
   float64 references (tests/reference.py) against the kernel on ``--device``.
2. ``models``: the toy models of the next steps, generated on this machine's disk.
3. ``merge``: whole-process ``mergekit-yaml`` (``--cuda`` on a GPU), lssf against
   ``task_arithmetic`` on the same inputs in the same run, best of 2, alternating, on a
   generated Llama-shaped model stored in bfloat16 (``1b``: about 0.9B parameters;
   ``--tiny``: the tiny toy). Wall-time ratio, peak host RSS, peak GPU memory (polled
   with nvidia-smi) and lssf's seconds in spectral work (from its summary).
4. ``cpu-vs-device``: the same recipe merged on the CPU and on ``--device`` for a
   small model: identical ranks, largest relative error per tensor.
5. ``precision``: the spectrum alone on Llama-8B shapes (4096x4096, 1024x4096,
   14336x4096; ``--tiny``: small ones) as float64 Gram + eigh, float32, and a mixed
   path (float32 Gram, float64 eigh): seconds, and whether each picks the float64
   entropy and noise-floor ranks.
6. ``executors``: ``mergekit-yaml --multi-gpu`` and ``--read-to-gpu`` with lssf (GPU
   only; their outputs against the plain ``--cuda`` merge), and concurrent kernel calls
   from several threads against the same calls in sequence.
7. ``contrastive``: the contrastive calibration of an 8B model (issue 46's target: 15
   minutes on one H100), extrapolated from two generated layers of its shape: forward,
   float64 Grams, generalized eigenproblems at widths 4096 and 14336
   (``benchmarks/bench_contrastive.py``).
8. ``tune``: ``mergekit-lssf tune``'s defaults on an 8B model (issue 48's target: 30
   minutes on one H100), extrapolated from generated Llama-3-8B-shaped models of two and
   four layers: a generate call and a forward at tune's batch on the device; a point and
   the default lssf term of each weight shape on the CPU, where tune computes them
   (``benchmarks/bench_tune.py``).

Writes DIR/gpu_check.json and DIR/gpu_check.md. The models are generated under DIR,
on the machine's local disk. The whole run is sized to fit in 9 minutes on one modern
GPU (the step limits below), so that it fits a 15-minute budget with the machine's start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import yaml
from mergekit_lssf.parameters import FusionSettings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)

#: step -> seconds it may take (the total stays under 9 minutes)
LIMITS = {"tests": 60, "models": 80, "merge": 150, "cpu-vs-device": 35, "precision": 45, "executors": 50,
          "contrastive": 75, "tune": 45}
SHAPES = {"full": [(4096, 4096), (1024, 4096), (14336, 4096)], "tiny": [(256, 256), (64, 256), (896, 256)]}


def _toy(directory: str, size: str, dtype: str = "bfloat16") -> str:
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    if not os.path.exists(os.path.join(directory, "finetuned", "model.safetensors")):
        build_toy_models(directory, ToySpec(size=size, dtype=dtype))
    return directory


def _recipe(directory: str, method: str, name: str) -> str:
    models = {"task_arithmetic": [{"model": "./aligned", "parameters": {"weight": 1.0}},
                                  {"model": "./unaligned", "parameters": {"weight": -1.0}}],
              "lssf": [{"model": "./aligned", "parameters": {"role": "aligned"}},
                       {"model": "./unaligned", "parameters": {"role": "unaligned"}}]}[method]
    doc = {"merge_method": method, "base_model": "./finetuned", "models": models,
           "dtype": "float32", "out_dtype": "bfloat16",
           **({"parameters": {"round_to": "bfloat16"}} if method == "lssf" else {})}
    with open(os.path.join(directory, name), "w", encoding="utf-8") as fp:
        yaml.safe_dump(doc, fp)
    return name


class GpuMemory:
    """Peak used GPU memory (MiB) by polling nvidia-smi every 0.2 s; None without it."""

    def __init__(self, device: str):
        self.peak: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if device == "cuda" and shutil.which("nvidia-smi") else None

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            values = [float(x) for x in out.stdout.split() if x.strip()]
            if values:
                self.peak = max(self.peak or 0.0, max(values))
            self._stop.wait(0.2)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def _merge(directory: str, recipe: str, out: str, flags: List[str], device: str) -> Dict:
    """One whole mergekit-yaml process: wall s, peak RSS MiB, peak GPU MiB, spectral s."""
    shutil.rmtree(os.path.join(directory, out), ignore_errors=True)
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
             "w = time.perf_counter() - t; sys.stderr.write(r.stderr[-4000:]); "
             "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    with GpuMemory(device) as memory:
        done = subprocess.run([sys.executable, "-c", probe, os.path.join(BIN, "mergekit-yaml"), recipe, out, *flags],
                              cwd=directory, capture_output=True, text=True)
    wall, rss, rc = done.stdout.split()
    if int(rc):
        raise RuntimeError(f"mergekit-yaml {recipe} {' '.join(flags)} failed: {done.stderr[-1500:]}")
    spectral = re.search(r"([0-9.]+) s in spectral work", done.stderr)
    return {"wall_s": float(wall), "rss_mib": int(rss) / 1024, "gpu_mib": memory.peak,
            "spectral_s": float(spectral.group(1)) if spectral else None}


def step_tests(args) -> Dict:
    cuda = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import numpy as np
    import torch
    from reference import make_delta, reference_fuse, spectra

    from mergekit_lssf.kernel import lssf_fuse

    checks = []
    for (rows, cols), (spectrum, values) in zip([(96, 160), (160, 96), (128, 128)], spectra(96).items()):
        delta = make_delta(rows, cols, values, seed=1)
        rng = np.random.default_rng(2)
        un = rng.standard_normal((rows, cols)) * 0.02
        ft = un + delta + rng.standard_normal((rows, cols)) * 1e-3
        for rule, fusion in (("entropy", "add"), ("entropy", "restore"), ("noise_floor", "restore")):
            expected, r = reference_fuse(ft, un + delta, un, alpha=0.8, eta=0.9, max_rank=256, rank_rule=rule, fusion=fusion)
            t = lambda x: torch.tensor(x, dtype=torch.float32, device=args.device)  # noqa: E731
            got, info = lssf_fuse(t(ft), t(un + delta), t(un), FusionSettings(alpha=0.8, eta=0.9, max_rank=256, rank_rule=rule, fusion=fusion))
            error = float(np.abs(got.cpu().double().numpy() - expected).max() / np.abs(expected).max())
            checks.append({"spectrum": spectrum, "shape": [rows, cols], "rule": rule, "fusion": fusion,
                           "rank": info.rank, "reference_rank": r, "max_rel_error": error})
    ok = cuda.returncode in (0, 5) and all(c["rank"] == c["reference_rank"] and c["max_rel_error"] < 1e-4 for c in checks)
    return {"ok": ok, "pytest_k_cuda": cuda.stdout.strip().splitlines()[-1:] or [cuda.stderr[-300:]],
            "pytest_rc": cuda.returncode, "kernel_vs_float64_reference": checks}


def _merge_size(args) -> str:
    return "tiny" if args.tiny else "1b"


def _small_size(args) -> str:
    return "tiny" if args.tiny else "small"


def step_models(args) -> Dict:
    """Generate the models of the later steps on this machine's disk (not copied there)."""
    from mergekit_lssf.toy_models import count_parameters

    started = time.perf_counter()
    _toy(os.path.join(args.out, "models", _merge_size(args)), _merge_size(args))
    _toy(os.path.join(args.out, "models", "small"), _small_size(args), "float32")
    return {"ok": True, "merge_model": _merge_size(args), "parameters": count_parameters(_merge_size(args)),
            "stored": "bfloat16", "seconds": time.perf_counter() - started}


def step_merge(args) -> Dict:
    size = _merge_size(args)
    directory = _toy(os.path.join(args.out, "models", size), size)
    flags = ["--cuda"] if args.device == "cuda" else []
    best: Dict[str, Dict] = {}
    for _ in range(2):
        for method in ("task_arithmetic", "lssf"):  # alternating, so drift hits both
            run = _merge(directory, _recipe(directory, method, f"{method}.yml"), f"out-{method}", flags, args.device)
            if method not in best or run["wall_s"] < best[method]["wall_s"]:
                best[method] = run
    ratio = best["lssf"]["wall_s"] / best["task_arithmetic"]["wall_s"]
    return {"ok": True, "size": size, "flags": flags, "task_arithmetic": best["task_arithmetic"], "lssf": best["lssf"],
            "time_ratio": ratio, "target": "<= 1.3x (aim 1.1x)", "meets_target": ratio <= 1.3}


def step_cpu_vs_device(args) -> Dict:
    from safetensors.torch import load_file

    directory = _toy(os.path.join(args.out, "models", "small"), _small_size(args), "float32")
    recipe = _recipe(directory, "lssf", "lssf.yml")
    outputs = {}
    for label, flags in (("cpu", []), (args.device, ["--cuda"] if args.device == "cuda" else [])):
        out = f"out-{label}-check"
        shutil.rmtree(os.path.join(directory, out), ignore_errors=True)
        done = subprocess.run([os.path.join(BIN, "mergekit-yaml"), recipe, out, "-v", *flags], cwd=directory,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-1500:])
        ranks = dict(re.findall(r"lssf (\S+) \([0-9, ]+\): rank (\d+)", done.stderr))
        outputs[label] = (ranks, load_file(os.path.join(directory, out, "model.safetensors")))
    (cpu_ranks, cpu), (dev_ranks, dev) = outputs["cpu"], outputs[args.device]
    errors = {n: float((dev[n].float() - cpu[n].float()).norm() / cpu[n].float().norm().clamp(min=1e-30)) for n in cpu}
    same = cpu_ranks == dev_ranks and bool(cpu_ranks)
    worst = max(errors.values())
    return {"ok": same and worst < 1e-3, "identical_ranks": same, "tensors": len(cpu_ranks), "max_rel_error": worst}


def step_precision(args) -> Dict:
    import torch

    from mergekit_lssf.kernel import _singular_values, data_free_subspace, noise_floor, select_rank

    device = torch.device(args.device)
    rows_out = []
    for rows, cols in SHAPES["tiny" if args.tiny else "full"]:
        g = torch.Generator().manual_seed(0)
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
        sigma = torch.cat([torch.logspace(0, -1, 32), 0.02 * torch.rand(k - 32, generator=g)]).sort(descending=True).values
        delta = ((u * sigma) @ v.T * 0.01).to(torch.bfloat16).float().to(device)  # a bf16-rounded delta
        row = {"shape": [rows, cols]}
        ranks = {}
        for label in ("float64", "float32", "mixed"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if label == "mixed":  # float32 Gram, float64 eigh
                d = delta if rows <= cols else delta.T
                evals = torch.linalg.eigvalsh((d @ d.T).double())
                s = _singular_values(evals.flip(0), torch.float32)
            else:
                s = data_free_subspace(delta, compute_dtype=getattr(torch, label), vectors=lambda _s: 0).sigma
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            choice = select_rank(s.cpu(), eta=0.9, max_rank=None)
            ranks[label] = (choice.rank, noise_floor(s.cpu(), (rows, cols))[0])
            row[label] = {"seconds": seconds, "entropy_rank": ranks[label][0], "noise_floor_rank": ranks[label][1]}
        for label in ("float32", "mixed"):
            row[label]["same_ranks_as_float64"] = ranks[label] == ranks["float64"]
        rows_out.append(row)
    return {"ok": True, "device": args.device, "shapes": rows_out}


def step_executors(args) -> Dict:
    import torch

    from mergekit_lssf.kernel import lssf_fuse

    result: Dict = {"ok": True}
    # concurrent kernel calls on the CPU: every thread gets its own sequential answer
    g = torch.Generator().manual_seed(5)
    jobs = [tuple(torch.randn(96, 128, generator=g) * 0.02 for _ in range(3)) for _ in range(8)]
    sequential = [lssf_fuse(*j, FusionSettings(fusion="add", alpha=1.0, eta=0.9))[0] for j in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda j: lssf_fuse(*j, FusionSettings(fusion="add", alpha=1.0, eta=0.9))[0], jobs))
    result["threads_match_sequence"] = all(torch.equal(a, b) for a, b in zip(sequential, threaded))
    result["ok"] = result["threads_match_sequence"]
    if args.device != "cuda":
        result["multi_gpu"] = result["read_to_gpu"] = "skipped: no CUDA device"
        return result
    from safetensors.torch import load_file

    directory = _toy(os.path.join(args.out, "models", "small"), _small_size(args), "float32")
    recipe = _recipe(directory, "lssf", "lssf.yml")
    outputs = {}
    for label, flags in (("cuda", ["--cuda"]), ("multi_gpu", ["--cuda", "--multi-gpu"]), ("read_to_gpu", ["--cuda", "--read-to-gpu"])):
        run = _merge(directory, recipe, f"out-{label}", flags, args.device)
        outputs[label] = load_file(os.path.join(directory, f"out-{label}", "model.safetensors"))
        result[f"{label}_wall_s"] = run["wall_s"]
    for label in ("multi_gpu", "read_to_gpu"):
        worst = max(float((outputs[label][n].float() - t.float()).norm() / t.float().norm().clamp(min=1e-30))
                    for n, t in outputs["cuda"].items())
        result[f"{label}_max_rel_error_vs_cuda"] = worst
        result["ok"] = result["ok"] and worst < 1e-3
    return result


def step_contrastive(args) -> Dict:
    """The contrastive calibration of an 8B model (128 anchors, 1000 task rows of 128
    tokens), extrapolated from two generated layers of Llama-3-8B's shape on the device:
    forward, float64 Grams, and the generalized eigenproblem at widths 4096 and 14336
    (``--tiny``: a small shape; on a CPU the widest solve is extrapolated as n^3).
    Issue 46's target: <= 15 minutes on one H100."""
    import torch

    sys.path.insert(0, HERE)
    from bench_contrastive import MODELS, calibration_estimate, layer_parts

    shape = (256, 896, 32, 8, 2) if args.tiny else MODELS["Llama-3-8B"]
    device = torch.device(args.device)
    parts = layer_parts(shape, 256 if args.tiny else 2048, device, measure_widest=args.tiny or device.type == "cuda")
    estimate = calibration_estimate(parts, shape)
    return {"ok": estimate["total_s"] > 0, "shape": list(shape), "parts": parts, "estimate_8b": estimate,
            "within_15_min": estimate["total_s"] <= 900}


def step_tune(args) -> Dict:
    """``mergekit-lssf tune``'s defaults (2 families x 5 points, 64 + 30 prompts, 32
    measurement rows) on an 8B model, from the parts ``bench_tune`` measures on the
    device (``--tiny``: a tiny shape). Issue 48's target: <= 30 minutes on one H100."""
    import torch

    sys.path.insert(0, HERE)
    from bench_tune import MODELS, default_estimate, measured_parts, term_layer_seconds, tune_defaults

    shape = MODELS["tiny" if args.tiny else "Llama-3-8B"]
    device = torch.device(args.device)
    defaults = tune_defaults()
    parts = measured_parts(shape, device, batch=defaults["batch"], new_tokens=defaults["new_tokens"])
    terms = term_layer_seconds(shape)
    parts.update(term_layer_s=terms["layer_s"], term_shapes=terms["per_shape"])
    estimate = default_estimate(parts, shape, defaults)
    return {"ok": estimate["total_s"] > 0, "shape": list(shape), "parts": parts, "estimate_8b": estimate,
            "within_30_min": estimate["total_s"] <= 1800}


STEPS = {"tests": step_tests, "models": step_models, "merge": step_merge, "cpu-vs-device": step_cpu_vs_device,
         "precision": step_precision, "executors": step_executors, "contrastive": step_contrastive, "tune": step_tune}


def markdown(report: Dict) -> str:
    lines = [f"# gpu_check: {report['machine']}", "", "| step | status | seconds | result |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        shown = {k: v for k, v in step.items() if k not in ("status", "seconds", "ok")}
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.0f} | `{json.dumps(shown)[:400]}` |")
    return "\n".join(lines) + "\n"


def run_steps(args, report: Dict, names: List[str], limits: Dict[str, float]) -> Dict:
    """Run each step in a child process under its limit, record it in ``report`` (and
    DIR/gpu_check.json after every step) and go on after a failure or a time-out."""
    for name in names:
        command = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--device", args.device, "--step", name]
        command += ["--tiny"] if args.tiny else []
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limits[name], cwd=ROOT)
            if done.returncode:
                step = {"status": "failed", "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
            else:
                data = json.loads(done.stdout.strip().splitlines()[-1])
                step = {"status": "passed" if data.get("ok") else "failed", **data}
        except subprocess.TimeoutExpired:
            step = {"status": f"timed out after {limits[name]:g} s"}
        step["seconds"] = time.perf_counter() - started
        report["steps"][name] = step
        print(f"{name}: {step['status']} ({step['seconds']:.0f} s)", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as fp:
            json.dump(report, fp, indent=1)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy models and small shapes (the CI smoke test)")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke test)")
    report = {"machine": f"{platform.node()}, {os.cpu_count()} cores, device {args.device}" + (", tiny" if args.tiny else ""),
              "steps": {}}
    if args.device == "cuda":
        import torch

        report["machine"] += f" ({torch.cuda.get_device_name(0)})"
    run_steps(args, report, list(STEPS), LIMITS)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as fp:
        fp.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
