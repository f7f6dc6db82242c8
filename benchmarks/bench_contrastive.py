"""The contrastive repair's cost (issue 46): calibration, file size, merge against task_arithmetic.

    python benchmarks/bench_contrastive.py --merge w576-l30 200m [--repeats 2]
    python benchmarks/bench_contrastive.py --calibration [--rows 32 128 512] [--depths 8 24 48] [--widths 10m 50m 200m]
    python benchmarks/bench_contrastive.py --eight-b [--tokens 2048] [--device cpu|cuda]

--merge: per size, generated Llama-shaped models stored in bfloat16 (``w576-l30`` has
SmolLM2-135M's layer shapes, the testbed's models; ``200m`` about 200M parameters);
``mergekit-lssf calibrate RECIPE --task`` with the default ``--max-rank 256`` (64 task
rows, 64 anchors with a fixed refusal, so no generation); then whole-process
``mergekit-yaml`` of ``fusion: contrastive`` (every stored vector, k = min(256, width))
against ``task_arithmetic`` and ``linear`` on the same input models, alternating, best
of ``--repeats``. Every recipe computes in float32 and writes bfloat16 (``dtype:
float32``, ``out_dtype: bfloat16``; lssf with ``round_to: bfloat16``).

--calibration: calibrate's whole-process time, peak RSS and file size against the
number of rows (half anchors, half task), depth (hidden 512, 8/24/48 layers) and width.

--eight-b: Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 kv
heads). Two generated decoder layers run a forward over ``--tokens`` tokens on
``--device``; the raw float64 input Grams of the four input sites are accumulated as
calibrate does; the generalized eigenproblem (``contrastive.contrastive_basis``) is
solved at width 4096 and, unless ``--skip-14336``, 14336 (on a CPU: timed at 4096 and
8192 and extrapolated as n^3). Then the whole calibration of an 8B model on 128 anchors
and 1000 task rows of ``--row-tokens`` tokens each is extrapolated from the parts.

Sizes on disk: the file stores, per input site of width n, V and BV (n x k) and mu (n),
float64: 8 (2 n k + n) bytes. ``file_bytes`` gives the 8B and 70B figures from that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import BIN, HERE, timed, toy_models  # noqa: E402

#: decoder shapes: (hidden, intermediate, layers, heads, kv heads)
MODELS = {"Llama-3-8B": (4096, 14336, 32, 32, 8), "Llama-3-70B": (8192, 28672, 80, 64, 8)}
WORDS = ("make build find explain write the a poem recipe plan list how to bake bread story about cats dogs rain "
         "code river stone light").split()
REFUSAL = "I can't help with that. It could cause serious harm."


def site_widths(hidden: int, intermediate: int):
    """The input widths of one decoder block's input sites: q/k/v, o, gate/up, down."""
    return [hidden, hidden, hidden, intermediate]


def file_bytes(hidden: int, intermediate: int, layers: int, k=None) -> int:
    """The calibration file's tensor bytes: per site 8 (2 n k + n), k = n for ``full``."""
    total = 0
    for n in site_widths(hidden, intermediate):
        kk = n if k is None else min(k, n)
        total += 8 * (2 * n * kk + n)
    return layers * total


def write_rows(directory: str, rows: int, seed: int = 0):
    """``task.jsonl`` and ``anchors.jsonl`` of ``rows`` rows each (random words)."""
    import random

    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(os.path.join(directory, "task.jsonl"), "w", encoding="utf-8") as fp:
        for _ in range(rows):
            fp.write(json.dumps({"prompt": say(8), "answer": say(12)}) + "\n")
    with open(os.path.join(directory, "anchors.jsonl"), "w", encoding="utf-8") as fp:
        for _ in range(rows):
            fp.write(json.dumps({"prompt": say(8), "response": REFUSAL}) + "\n")


def recipes(directory: str) -> None:
    both = {"dtype": "float32", "out_dtype": "bfloat16"}
    docs = {
        "calibrate": {"merge_method": "lssf", "base_model": "./finetuned",
                      "models": [{"model": "./aligned", "parameters": {"role": "aligned"}}],
                      "parameters": {"fusion": "contrastive", "calibration": "ft.contrastive.safetensors",
                                     "lam": 3, "round_to": "bfloat16"}, **both},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "./finetuned",
                            "models": [{"model": "./aligned", "parameters": {"weight": 1.0}},
                                       {"model": "./unaligned", "parameters": {"weight": -1.0}}], **both},
        "linear": {"merge_method": "linear",
                   "models": [{"model": "./finetuned", "parameters": {"weight": 0.75}},
                              {"model": "./aligned", "parameters": {"weight": 0.25}}], **both},
    }
    docs["contrastive"] = docs["calibrate"]
    for name, doc in docs.items():
        with open(os.path.join(directory, f"{name}.yml"), "w", encoding="utf-8") as fp:
            yaml.safe_dump(doc, fp)


def calibrate(directory: str, rows: int):
    """calibrate's wall seconds, peak RSS (MiB) and file size (MiB) on ``rows`` rows per set."""
    write_rows(directory, rows)
    recipes(directory)
    out = os.path.join(directory, "ft.contrastive.safetensors")
    if os.path.exists(out):
        os.remove(out)
    command = [os.path.join(BIN, "mergekit-lssf"), "calibrate", "calibrate.yml", "--task", "task.jsonl",
               "--anchors", "anchors.jsonl", "--out", out, "--device", "cpu"]
    wall, rss = timed(command, directory)
    return wall, rss, os.path.getsize(out) / 2**20


def bench_merge(sizes, repeats, workdir):
    from mergekit_lssf.toy_models import count_parameters

    print("| size | params | calibrate s / MiB RSS / file MiB | task_arithmetic s | linear s | contrastive s | "
          "contrastive / task_arithmetic | contrastive / linear | peak RSS MiB (ta / contrastive) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        directory = toy_models(workdir, size, "bfloat16")
        cal = calibrate(directory, 64)
        best = {}
        for _ in range(repeats):
            for method in ("task_arithmetic", "linear", "contrastive"):  # alternate, so drift hits all
                out = os.path.join(directory, f"out-{method}")
                shutil.rmtree(out, ignore_errors=True)
                wall, rss = timed([os.path.join(BIN, "mergekit-yaml"), f"{method}.yml", out], directory)
                old = best.get(method, (float("inf"), float("inf")))
                best[method] = (min(old[0], wall), min(old[1], rss))
        ta, li, co = best["task_arithmetic"], best["linear"], best["contrastive"]
        print(f"| {size} | {count_parameters(size) / 1e6:.0f}M | {cal[0]:.1f} / {cal[1]:.0f} / {cal[2]:.1f} | "
              f"{ta[0]:.2f} | {li[0]:.2f} | {co[0]:.2f} | {co[0] / ta[0]:.2f}x | {co[0] / li[0]:.2f}x | "
              f"{ta[1]:.0f} / {co[1]:.0f} |", flush=True)


def bench_calibration(rows, depths, widths, workdir):
    from mergekit_lssf.toy_models import SIZES, count_parameters

    print("| models | hidden / intermediate / layers | rows per set | calibrate s | peak RSS MiB | file MiB | "
          "file MiB by the formula |")
    print("|---|---|---|---|---|---|---|")
    runs = [("w512-l8", r) for r in rows] + [(f"w512-l{d}", rows[0]) for d in depths] + [(w, rows[0]) for w in widths]
    seen = set()
    for size, n in runs:
        if (size, n) in seen:
            continue
        seen.add((size, n))
        hidden, inter, layers = SIZES[size][:3]
        wall, rss, mib = calibrate(toy_models(workdir, size, "bfloat16"), n)
        print(f"| {size} ({count_parameters(size) / 1e6:.0f}M) | {hidden} / {inter} / {layers} | {n} | {wall:.1f} | "
              f"{rss:.0f} | {mib:.1f} | {file_bytes(hidden, inter, layers, 256) / 2**20:.1f} |", flush=True)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def solve_seconds(n: int, device, tokens: int = 4096) -> float:
    """Seconds of ``contrastive_basis`` at width ``n`` (k = 256) on Grams of random
    activations: C_H of rank ``tokens // 4``, C_T of rank ``tokens`` (both below n when
    n is large, as in a real calibration)."""
    import torch

    from mergekit_lssf.contrastive import contrastive_basis, trace_normalised

    gen = torch.Generator(device="cpu").manual_seed(n)
    x_h = torch.randn(tokens // 4, n, generator=gen, dtype=torch.float64).to(device)
    x_t = torch.randn(tokens, n, generator=gen, dtype=torch.float64).to(device)
    c_h, c_t = trace_normalised(x_h.T @ x_h), trace_normalised(x_t.T @ x_t)
    del x_h, x_t
    _sync(device)
    started = time.perf_counter()
    contrastive_basis(c_h, c_t, eps=1e-6, k=256)
    _sync(device)
    return time.perf_counter() - started


def layer_parts(shape, tokens: int, device, measure_widest: bool) -> dict:
    """Measured parts of a calibration on ``device`` for decoder layers of ``shape``
    (hidden, intermediate, layers, heads, kv heads): a forward of two generated layers
    over ``tokens`` tokens (bfloat16 on a GPU, float32 on a CPU), the float64 raw Grams of
    their input sites (forward pre-hooks, as calibrate takes them), and the generalized
    eigenproblem at width ``hidden`` and ``intermediate``; without ``measure_widest`` the
    latter is timed at ``2 * hidden`` and extrapolated as n^3."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hidden, inter, _, heads, kv = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=2, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"  # standalone layers: no model to dispatch it
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(config, i).to(device, dtype).eval() for i in range(2)]
    rotary = LlamaRotaryEmbedding(config).to(device)
    seq = min(256, tokens)
    batch = max(1, tokens // seq)
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype) * 0.02
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    mask = torch.full((seq, seq), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]
    grams = {}

    def record(name):
        def hook(_module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + a.T @ a
        return hook

    def forward() -> float:
        _sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            h = x
            for layer in layers:
                out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary(x, positions))
                h = out[0] if isinstance(out, tuple) else out
        _sync(device)
        return time.perf_counter() - started

    forward()  # warm-up
    plain = forward()
    handles = [layer.get_submodule(name).register_forward_pre_hook(record(f"{i}.{name}"))
               for i, layer in enumerate(layers)
               for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    with_grams = forward()
    for handle in handles:
        handle.remove()
    layers.clear()
    solve = {hidden: solve_seconds(hidden, device)}
    if measure_widest:
        solve[inter] = solve_seconds(inter, device)
    else:
        solve[2 * hidden] = solve_seconds(2 * hidden, device)
        solve[inter] = solve[2 * hidden] * (inter / (2 * hidden)) ** 3
    return {"tokens": batch * seq, "forward_2_layers_s": plain, "grams_2_layers_s": max(with_grams - plain, 0.0),
            "solve_s": {str(k): v for k, v in solve.items()}, "widest_measured": measure_widest}


def calibration_estimate(parts: dict, shape, anchors: int = 128, task_rows: int = 1000, row_tokens: int = 128) -> dict:
    """A whole calibration of a model of ``shape`` extrapolated from ``layer_parts``:
    forward and Grams scale with tokens and layers, the eigenproblems with layers (three
    sites of width ``hidden`` and one of ``intermediate`` per layer)."""
    hidden, inter, layers = shape[:3]
    total_tokens = (anchors + task_rows) * row_tokens
    scale = total_tokens / parts["tokens"] * layers / 2
    per_layer_solve = 3 * parts["solve_s"][str(hidden)] + parts["solve_s"][str(inter)]
    estimate = {"tokens": total_tokens, "forward_s": parts["forward_2_layers_s"] * scale,
                "grams_s": parts["grams_2_layers_s"] * scale, "solves_s": per_layer_solve * layers}
    estimate["total_s"] = estimate["forward_s"] + estimate["grams_s"] + estimate["solves_s"]
    return estimate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", nargs="*", default=[], metavar="SIZE")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calibration", action="store_true")
    parser.add_argument("--rows", nargs="*", type=int, default=[32, 128, 512])
    parser.add_argument("--depths", nargs="*", type=int, default=[8, 24, 48])
    parser.add_argument("--widths", nargs="*", default=["10m", "50m", "200m"])
    parser.add_argument("--eight-b", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--row-tokens", type=int, default=128, help="--eight-b: tokens per rendered row")
    parser.add_argument("--skip-14336", action="store_true", help="--eight-b on a GPU: extrapolate 14336 too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=os.path.join(HERE, "_work"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print("| model | file GiB at k = 256 | file GiB at full |")
    print("|---|---|---|")
    for name, (hidden, inter, layers, _, _) in MODELS.items():
        print(f"| {name} | {file_bytes(hidden, inter, layers, 256) / 2**30:.2f} | "
              f"{file_bytes(hidden, inter, layers) / 2**30:.1f} |")
    if args.merge:
        bench_merge(args.merge, args.repeats, args.workdir)
    if args.calibration:
        bench_calibration(args.rows, args.depths, args.widths, args.workdir)
    if args.eight_b:
        import torch

        device = torch.device(args.device)
        shape = MODELS["Llama-3-8B"]
        parts = layer_parts(shape, args.tokens, device, measure_widest=device.type == "cuda" and not args.skip_14336)
        print(json.dumps(parts))
        estimate = calibration_estimate(parts, shape, row_tokens=args.row_tokens)
        print(json.dumps(estimate))
        print(f"8B calibration, 128 anchors + 1000 task rows x {args.row_tokens} tokens on {args.device}: about "
              f"{estimate['total_s'] / 60:.1f} min (forward {estimate['forward_s']:.0f} s, Grams {estimate['grams_s']:.0f} s, "
              f"eigenproblems {estimate['solves_s']:.0f} s)")


if __name__ == "__main__":
    main()
