"""Small Llama-shaped models with a planted safety delta, built locally (no downloads).

Used by ``mergekit-lssf demo``, the tests and the benchmarks. Three checkpoints:

* ``unaligned``: a randomly initialised ``LlamaForCausalLM``.
* ``aligned`` = unaligned + ``S``: on every linear weight a planted low-rank "safety
  delta" ``S`` (``planted_rank + 2 * (layer % 3)`` directions, geometric singular
  values) plus a small full-rank noise tail, so the entropy rank has a realistic
  spectrum to work on.
* ``finetuned`` = aligned - ``erosion * S_lowrank`` + ``D``: fine-tuning erased
  part of the planted directions and added a dense task drift ``D``.

Each directory holds config.json, model.safetensors and a tokenizer with a chat
template, so mergekit and transformers load them as they would a real model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from mergekit_lssf.fused import fuses

#: Named sizes: (hidden, intermediate, layers, heads, kv_heads, vocab).
SIZES = {
    "tiny": (64, 160, 2, 4, 2, 384),
    "small": (128, 344, 4, 4, 2, 2048),
    "10m": (256, 688, 8, 8, 4, 8192),
    "50m": (512, 1376, 10, 8, 4, 16000),
    "200m": (1024, 2752, 12, 16, 8, 32000),
    "1b": (2048, 5504, 16, 16, 8, 32000),
    # same width, growing depth: for the calibration memory benchmark
    "w512-l8": (512, 1376, 8, 8, 4, 16000),
    "w512-l24": (512, 1376, 24, 8, 4, 16000),
    "w512-l48": (512, 1376, 48, 8, 4, 16000),
    # SmolLM2-135M's shapes (the testbed's models; untied head): contrastive merge benchmark
    "w576-l30": (576, 1536, 30, 9, 3, 49152),
    # Llama-2-7B's layer shapes, two layers: for the calibration time benchmark
    "w4096-l2": (4096, 11008, 2, 32, 32, 4096),
}


@dataclass(frozen=True)
class ToySpec:
    """How the three toy models differ; all magnitudes relative to ``||W||_F``."""

    size: str = "tiny"
    planted_rank: int = 4
    safety_scale: float = 0.2
    noise_scale: float = 0.01
    erosion: float = 1.0
    drift_scale: float = 0.05
    extra_tokens: int = 0
    seed: int = 0
    #: how the three checkpoints are stored: "float32", or "bfloat16" / "float16" as
    #: released checkpoints are (each model rounded from its float32 values on save)
    dtype: str = "float32"


def llama_config(size: str, vocab_extra: int = 0, dtype: str = "float32"):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab + vocab_extra,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def count_parameters(size: str) -> int:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """The weights LSSF fuses (``fused.fuses``), which get the planted delta."""
    return fuses(name, tuple(tensor.shape), tensor.is_floating_point())


def _low_rank(shape, rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    rows, cols = shape
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen))
    sigma = scale * torch.logspace(0, -1, rank)
    return (u * sigma) @ v.T


def _tokenizer(vocab_size: int):
    """A character-level fast tokenizer with a chat template, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return fast


def _save(state: Dict[str, torch.Tensor], config, tokenizer, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


def build_toy_models(out_dir: str, spec: Optional[ToySpec] = None) -> Dict[str, str]:
    """Write ``unaligned``, ``aligned`` and ``finetuned`` under ``out_dir``.

    Also writes ``planted.safetensors`` (the low-rank safety delta ``S`` and the
    drift ``D`` per linear weight, for measuring what a merge restored) and
    ``toy_spec.json``. Returns the three model paths by role.
    """
    from transformers import LlamaForCausalLM

    spec = spec or ToySpec()
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    if spec.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ToySpec.dtype must be float32, bfloat16 or float16, got {spec.dtype!r}")
    config = llama_config(spec.size, dtype=spec.dtype)
    with torch.no_grad():
        unaligned = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    aligned, finetuned, planted = {}, {}, {}
    for name, w in unaligned.items():
        if not is_linear_weight(name, w):
            aligned[name] = w.clone()
            finetuned[name] = w.clone()
            continue
        norm = float(w.norm())
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        rank = spec.planted_rank + 2 * (layer % 3)  # vary the rank across layers
        safety = _low_rank(w.shape, rank, spec.safety_scale * norm, gen)
        noise = torch.randn(w.shape, generator=gen) * (spec.noise_scale * norm / w.numel() ** 0.5)
        drift = torch.randn(w.shape, generator=gen) * (spec.drift_scale * norm / w.numel() ** 0.5)
        aligned[name] = w + safety + noise
        finetuned[name] = aligned[name] - spec.erosion * safety + drift
        planted[f"{name}.safety"] = safety
        planted[f"{name}.drift"] = drift
    paths = {}
    for role, state in (("unaligned", unaligned), ("aligned", aligned), ("finetuned", finetuned)):
        cfg, tok_size = config, config.vocab_size
        if role == "finetuned" and spec.extra_tokens:
            cfg = llama_config(spec.size, spec.extra_tokens, spec.dtype)
            tok_size = cfg.vocab_size
            state = dict(state)
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                extra = torch.randn(spec.extra_tokens, state[name].shape[1], generator=gen) * 0.02
                state[name] = torch.cat([state[name], extra])
        paths[role] = os.path.join(out_dir, role)
        stored = {k: v.to(getattr(torch, spec.dtype)) for k, v in state.items()}
        _save(stored, cfg, _tokenizer(tok_size), paths[role])
    from safetensors.torch import save_file

    save_file(planted, os.path.join(out_dir, "planted.safetensors"))
    with open(os.path.join(out_dir, "toy_spec.json"), "w", encoding="utf-8") as fp:
        json.dump(asdict(spec), fp, indent=2)
    return paths
