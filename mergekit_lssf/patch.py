"""``mergekit-lssf extract-patch``: the safety term as a PEFT LoRA adapter.

The fused term ``alpha * P' delta`` has rank r per weight and depends only on the
aligned and unaligned models, not on the fine-tune. Written as a LoRA adapter
(``B @ A = alpha * P' delta`` exactly, balanced factors, scaling 1 through
``rank_pattern``/``alpha_pattern``), it repairs any fine-tune of the aligned model
at load time, in a multi-LoRA server, or merged with ``merge_and_unload()``.
"""

from __future__ import annotations

import os
import re
from typing import Dict

import torch
from mergekit.config import MergeConfiguration
from safetensors.torch import save_file

from mergekit_lssf.kernel import balanced_factors
from mergekit_lssf.traversal import aligned_model, fused_factors

PREFIX = "base_model.model."


def extract_patch(
    config: MergeConfiguration, out_dir: str, *, cuda: bool = False, dtype: torch.dtype = torch.float32
) -> Dict[str, int]:
    """Write adapter_config.json and adapter_model.safetensors; returns rank per module."""
    from peft import LoraConfig

    state: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    for tensor in fused_factors(config, cuda=cuda):
        alpha = tensor.parameters["alpha"]
        left, right = tensor.factors.left, tensor.factors.right
        if left is None or alpha == 0:
            continue
        b, a = balanced_factors(left, right, alpha)
        module = tensor.name.removesuffix(".weight")
        state[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        state[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[module] = b.shape[1]
    if not ranks:
        raise SystemExit("lssf: nothing to patch (every fused tensor has rank 0 or alpha 0)")
    top = max(ranks.values())
    patterns = {re.escape(m): r for m, r in ranks.items()}
    lora = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),  # lora_alpha = r: scaling 1, B @ A is the term
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(aligned_model(config)),
    )
    os.makedirs(out_dir, exist_ok=True)
    lora.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return ranks
