"""What ``mergekit-lssf tune`` costs (issue 48): its measured parts on a device, and the
whole run extrapolated from them.

    python benchmarks/bench_tune.py --model SmolLM2-135M [--device cpu]   # check the model against a real run
    python benchmarks/bench_tune.py --model Llama-3-8B --device cuda        # the 8B estimate (gpu_check step 8)

A tune run measures ``points + 2`` models (every point of its families, the fine-tune
and the aligned model). Each measurement (``evaluate.measure_model``) is greedy
generation over the harmful and the benign prompts in batches of ``batch`` with
``new_tokens`` new tokens, teacher-forced forwards over the measurement rows and the
prose, and (a point) applying it to the resident fine-tune and undoing it.

The parts, measured here on generated Llama-shaped models of ``--model``'s shape with
two and with four decoder layers (random weights, float32, as tune loads every model):
a ``generate`` call of ``batch`` prompts of ``--prompt-tokens`` tokens with exactly
``new_tokens`` new ones, and one forward of ``batch`` rows of ``--row-tokens`` tokens,
on ``--device``. A decoder layer's share is half the four-layer time minus the two-layer
time; the rest (embeddings, head, the sampling loop) is the two-layer time minus two
layers' share, so a model of ``L`` layers takes ``rest + L * layer``.

Tune computes terms and points on the CPU whatever ``--device`` says (as plain
``mergekit-yaml`` does; ``tune_points``), so these two parts are timed on the CPU:

* a point, on one layer's fused weights: the merge's last step for an lssf point
  (``kernel.write_fused``: ``W_ft + alpha * term`` rounded into bfloat16 with the
  subspace-preserving rounding; an interpolation point is cheaper), copied into the
  resident model on ``--device`` after a CPU copy of the original is kept, then the
  original put back; scaled by the layer count;
* the ``lssf`` family's terms, once per run: the package's kernel
  (``kernel.safety_factors`` with the defaults, then ``with_finetune``) on one weight of
  each shape of a layer, on bfloat16-stored values upcast to float32, scaled by the
  count of each shape and the layer count.

An interpolation point also writes the embeddings and the head (``linear`` writes every
tensor): timed on the CPU as ``(1 - l) W_ft + l W_al``. Not included: reading the
checkpoints from disk (mergekit's loader reads the fine-tune's tensors again for every
point, and the aligned model's for every interpolation point; the page cache usually
holds them after the first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

#: decoder shapes: (hidden, intermediate, layers, heads, kv heads, vocabulary)
MODELS = {"SmolLM2-135M": (576, 1536, 30, 9, 3, 49152), "Llama-3-8B": (4096, 14336, 32, 32, 8, 128256),
          "tiny": (64, 160, 4, 4, 2, 512)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(shape, layers: int, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, _, heads, kv, vocab = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                         num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (an 8B-shaped layer is 0.9 GB in float32)
        return LlamaForCausalLM(config).to(dtype).eval()


def _seconds(fn, device, repeats: int = 2, warm_up: bool = True) -> float:
    """The best of ``repeats`` timed calls of ``fn``, after one warm-up call."""
    if warm_up:
        fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def measured_parts(shape, device, *, batch: int = 24, prompt_tokens: int = 48, new_tokens: int = 32,
                   row_tokens: int = 48) -> dict:
    """Seconds of one ``generate`` call and one teacher-forced forward (``batch`` rows)
    split into one decoder layer's share and the rest, and of applying and undoing a
    point on one layer's fused weights (module doc)."""
    import torch

    dtype = torch.float32  # as tune loads every model (generation.load_model)
    vocab = shape[5]
    prompts = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    rows = torch.randint(0, vocab, (batch, row_tokens), generator=torch.Generator().manual_seed(2)).to(device)
    timings = {}
    for layers in (2, 4):
        model = _model(shape, layers, device, dtype)
        timings[layers] = _call_seconds(model, prompts, rows, new_tokens, device)
        if layers == 2:
            apply_s = _apply_seconds(model.model.layers[0], device)
            outer_s = _interpolate_seconds([model.model.embed_tokens.weight, model.lm_head.weight])
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    parts = {"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "row_tokens": row_tokens,
             "dtype": str(dtype).replace("torch.", ""), "apply_layer_s": apply_s, "apply_outer_s": outer_s}
    for key in ("generate_s", "forward_s"):
        layer = max(timings[4][key] - timings[2][key], 0.0) / 2
        parts[key.replace("_s", "_layer_s")] = layer
        parts[key.replace("_s", "_rest_s")] = max(timings[2][key] - 2 * layer, 0.0)
    return parts


def _call_seconds(model, prompts, rows, new_tokens: int, device) -> dict:
    """Seconds of one greedy ``generate`` of ``prompts`` with exactly ``new_tokens`` new
    tokens, and of one forward of ``rows`` to log-probabilities (as ``row_nll``)."""
    import torch

    def generate():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0)

    def forward():
        model(rows).logits.double().log_softmax(-1)  # as measure.row_nll

    with torch.no_grad():
        return {"generate_s": _seconds(generate, device), "forward_s": _seconds(forward, device)}


def _apply_seconds(layer, device) -> float:
    """Seconds of one lssf point on every linear weight of ``layer`` (module doc): the
    merge's own last step on the CPU (``kernel.write_fused`` of the default restore term,
    alpha 0.5, rounded into bfloat16 with ``rounding: subspace``, from the fine-tune's
    bfloat16 values upcast to float32), put into the model on ``device`` after keeping a
    CPU copy of the original, then the original copied back. The term itself is made
    before the clock starts (``term_layer_seconds`` times it)."""
    import torch

    from mergekit_lssf.kernel import safety_factors, write_fused
    from mergekit_lssf.parameters import FusionSettings

    weights = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    gen = torch.Generator().manual_seed(3)
    stored, factors = [], []
    for w in weights:
        ft = w.detach().to("cpu", torch.bfloat16).float()  # the fine-tune as stored
        al = (ft + 1e-3 * torch.randn(ft.shape, generator=gen)).to(torch.bfloat16).float()
        un = (al + 1e-3 * torch.randn(ft.shape, generator=gen)).to(torch.bfloat16).float()
        stored.append(ft)
        factors.append(safety_factors(al, un, FusionSettings(fusion="restore")))

    def apply_and_undo():
        with torch.no_grad():
            kept = []
            for w, ft, f in zip(weights, stored, factors):
                point, _ = write_fused(ft, f, 0.5, out_dtype=torch.bfloat16, rounding="subspace")
                kept.append(w.detach().to("cpu", torch.bfloat16, copy=True))
                w.copy_(point.to(w.device, w.dtype))
            for w, original in zip(weights, kept):
                w.copy_(original.to(w.device, w.dtype))

    return _seconds(apply_and_undo, device)


def _interpolate_seconds(weights) -> float:
    """Seconds of an interpolation point's other tensors on the CPU (the embeddings and
    the head: ``linear`` writes every tensor): ``(1 - l) W_ft + l W_al`` in float32 from
    bfloat16-stored values, rounded once to bfloat16."""
    import torch

    stored = [w.detach().to("cpu", torch.bfloat16) for w in weights]

    def interpolate():
        for w in stored:
            (0.75 * w.float() + 0.25 * w.float()).to(torch.bfloat16)

    return _seconds(interpolate, torch.device("cpu"))


def tune_defaults() -> dict:
    """What a tune run with its defaults measures: points over every default family,
    prompts per harmful and benign set (as ``tune`` caps them), batch size and new tokens
    (``tune.TuneOptions``)."""
    from mergekit_lssf import evaluate as ev
    from mergekit_lssf.measure import evenly_spaced
    from mergekit_lssf.tune import TuneOptions, harmful_sets

    opts = TuneOptions()
    return {"points": opts.points * len(opts.families), "families": len(opts.families),
            "harmful": sum(len(v) for v in harmful_sets(opts.max_prompts).values()),
            "benign": len(evenly_spaced(ev.benign_prompts("test"), opts.max_prompts)),
            "batch": opts.batch_size, "new_tokens": opts.max_new_tokens}


def layer_shapes(shape) -> dict:
    """``(d_out, d_in) -> count`` of the fused linear weights of one decoder layer."""
    hidden, inter, _, heads, kv, _ = shape
    kv_width = hidden // heads * kv
    counts: dict = {}
    for out_in in ((hidden, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, hidden), (inter, hidden),
                   (inter, hidden), (hidden, inter)):
        counts[out_in] = counts.get(out_in, 0) + 1
    return counts


def term_layer_seconds(shape) -> dict:
    """Seconds of the default lssf term of one decoder layer on the CPU, where tune
    computes it (module doc): per weight shape, the best of two after a warm-up, times
    the shape's count."""
    import torch

    device = torch.device("cpu")

    from mergekit_lssf.kernel import safety_factors
    from mergekit_lssf.parameters import FusionSettings

    per_shape = {}
    for (rows, cols), count in layer_shapes(shape).items():
        gen = torch.Generator().manual_seed(rows * 7 + cols)
        u = torch.randn(rows, cols, generator=gen) * 0.02
        a = u + 1e-3 * torch.randn(rows, cols, generator=gen)
        w = a + 1e-3 * torch.randn(rows, cols, generator=gen)
        u, a, w = (t.to(torch.bfloat16).float().to(device) for t in (u, a, w))  # bf16-stored values
        seconds = _seconds(lambda: safety_factors(a, u, FusionSettings(fusion="restore")).with_finetune(w), device,
                           repeats=1, warm_up=False)  # seconds each at 8B shapes: one call (gpu_check's limit)
        per_shape[f"{rows}x{cols}"] = {"count": count, "seconds": seconds}
    return {"per_shape": per_shape, "layer_s": sum(v["count"] * v["seconds"] for v in per_shape.values())}


def tune_estimate(parts: dict, shape, *, points: int, harmful: int, benign: int, task_rows: int = 32,
                  interpolation_points: int = 0) -> dict:
    """Seconds of a tune run of ``points`` points on a model of ``shape``, from
    ``measured_parts``: ``points + 2`` measurements, each ``ceil(harmful / batch) +
    ceil(benign / batch)`` generate calls and ``ceil(task_rows / batch) + 1`` forwards
    (the rows and the prose), plus ``points`` applications (and the embeddings and head
    of each of the ``interpolation_points``), plus the lssf terms once when ``parts``
    has ``term_layer_s`` (module doc). ``tune_defaults`` gives tune's own counts;
    ``task_rows``: the measurement rows."""
    layers, batch = shape[2], parts["batch"]
    generate = parts["generate_rest_s"] + layers * parts["generate_layer_s"]
    forward = parts["forward_rest_s"] + layers * parts["forward_layer_s"]
    calls = math.ceil(harmful / batch) + math.ceil(benign / batch)
    forwards = math.ceil(task_rows / batch) + 1
    measurement = calls * generate + forwards * forward
    out = {"generate_call_s": generate, "forward_s": forward, "generate_calls": calls, "forwards": forwards,
           "measurement_s": measurement, "measurements": points + 2,
           "apply_s": points * layers * parts["apply_layer_s"] + interpolation_points * parts.get("apply_outer_s", 0.0),
           "terms_s": layers * parts.get("term_layer_s", 0.0)}
    out["total_s"] = out["measurements"] * measurement + out["apply_s"] + out["terms_s"]
    return out


def default_estimate(parts: dict, shape, defaults: dict, task_rows: int = 32) -> dict:
    """``tune_estimate`` at tune's defaults (``tune_defaults``: its families' points, one
    family of them interpolation)."""
    return tune_estimate(parts, shape, points=defaults["points"], harmful=defaults["harmful"],
                         benign=defaults["benign"], task_rows=task_rows,
                         interpolation_points=defaults["points"] // defaults["families"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="SmolLM2-135M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task-rows", type=int, default=32, help="measurement rows of the task")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="tokens of each generated-for prompt")
    parser.add_argument("--row-tokens", type=int, default=48, help="tokens of each teacher-forced row")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device)
    shape = MODELS[args.model]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {time.strftime('%Y-%m-%d')}")
    defaults = tune_defaults()
    parts = measured_parts(shape, device, batch=defaults["batch"], new_tokens=defaults["new_tokens"],
                           prompt_tokens=args.prompt_tokens, row_tokens=args.row_tokens)
    terms = term_layer_seconds(shape)
    parts.update(term_layer_s=terms["layer_s"], term_shapes=terms["per_shape"])
    estimate = default_estimate(parts, shape, defaults, args.task_rows)
    print(json.dumps({"model": args.model, "defaults": defaults, "parts": parts, "estimate": estimate}, indent=2))
    print(f"tune on {args.model} ({defaults['points']} points, {estimate['measurements']} measurements) on {args.device}: "
          f"about {estimate['total_s'] / 60:.1f} min ({estimate['measurement_s']:.1f} s a measurement, lssf terms "
          f"{estimate['terms_s']:.0f} s; reading the checkpoints not included)")


if __name__ == "__main__":
    main()
