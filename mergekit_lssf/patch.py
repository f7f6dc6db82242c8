"""``mergekit-lssf extract-patch``: the safety term as a PEFT LoRA adapter.

With ``fusion: add`` (the paper's rule) the fused term ``alpha * P' delta`` has rank r per
weight and depends only on the aligned and unaligned models, not on the fine-tune.
Written as a LoRA adapter (``B @ A = alpha * P' delta`` exactly, balanced factors,
scaling 1 through ``rank_pattern``/``alpha_pattern``), it repairs any fine-tune of the
aligned model at load time, in a multi-LoRA server, or merged with
``merge_and_unload()``. With ``fusion: restore`` (the default) the term ``alpha * P' (W_aligned -
W_ft)`` depends on the fine-tune: the adapter is for the recipe's ``base_model`` only,
and its config, metadata and README say so.

The adapter carries its provenance: safetensors metadata (``lssf_*`` keys) and a
README.md with the models, the effective parameters, the ranks and the versions.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch
from mergekit.config import MergeConfiguration
from peft import LoraConfig

from mergekit_lssf.kernel import balanced_factors
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.provenance import effective_parameters, fusion_words, roles, versions
from mergekit_lssf.recipe import check_recipe
from mergekit_lssf.safetensors_io import StreamedWriter
from mergekit_lssf.traversal import aligned_model, fused_factors

PREFIX = "base_model.model."
#: The files ``extract_patch`` writes (an output folder holding any of them is refused).
OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def extract_patch(
    config: MergeConfiguration, out_dir: str, *, cuda: bool = False, dtype: torch.dtype = torch.float32,
    lora_merge_cache: Optional[str] = None,
) -> Dict[str, int]:
    """Write adapter_config.json and adapter_model.safetensors; returns rank per module.

    The factors are streamed to the adapter file one module at a time (part files,
    then one file: PEFT loads a single ``adapter_model.safetensors``), so memory holds
    one weight's factors whatever the depth."""
    created = not os.path.exists(out_dir)
    writer = StreamedWriter(os.path.join(out_dir, "adapter_model.safetensors"))
    try:
        ranks, fusions = _stream_factors(config, writer, cuda, dtype, lora_merge_cache)
        _finish(config, out_dir, writer, ranks, fusions)
    finally:
        writer.close()
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):  # failed before writing
            os.rmdir(out_dir)
    return ranks


def _stream_factors(config: MergeConfiguration, writer: StreamedWriter, cuda: bool, dtype: torch.dtype,
                    lora_merge_cache: Optional[str]):
    """Rank per module and the fusions seen; each module's A and B go to ``writer``."""
    ranks: Dict[str, int] = {}
    fusions = set()
    for tensor in fused_factors(config, cuda=cuda, lora_merge_cache=lora_merge_cache):
        if tensor.expert is not None:
            raise LSSFConfigError(
                f"extract-patch: {tensor.name.rsplit('[', 1)[0]} is a stacked MoE expert weight, which a PEFT "
                "LoRA adapter cannot target; merge with mergekit-yaml instead (nothing was written)")
        fusions.add(tensor.parameters["fusion"])
        alpha = tensor.parameters["alpha"]
        left, right = tensor.factors.left, tensor.factors.right
        if left is None or alpha == 0:
            continue
        b, a = balanced_factors(left, right, alpha)
        module = tensor.name.removesuffix(".weight")
        writer.add({f"{PREFIX}{module}.lora_A.weight": a.to(dtype), f"{PREFIX}{module}.lora_B.weight": b.to(dtype)})
        ranks[module] = b.shape[1]
    if not ranks:
        raise LSSFConfigError("extract-patch: nothing to patch (every fused tensor has rank 0 or alpha 0); "
                              "nothing was written")
    return ranks, fusions


def _finish(config: MergeConfiguration, out_dir: str, writer: StreamedWriter, ranks: Dict[str, int], fusions) -> None:
    """The adapter file's header and metadata, adapter_config.json and README.md."""
    models = roles(config, check_recipe(config))
    parameters = effective_parameters(config)
    for_finetune = "restore" in fusions
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
        # a restore patch only fits the fine-tune it was computed from
        base_model_name_or_path=models["finetuned"] if for_finetune else str(aligned_model(config)),
    )
    metadata = {
        "format": "pt",
        "lssf_aligned": models["aligned"],
        "lssf_unaligned": models["unaligned"],
        "lssf_finetuned": models["finetuned"],
        "lssf_applies_to": ("only " + models["finetuned"]) if for_finetune
        else "any fine-tune of " + models["aligned"],
        "lssf_parameters": json.dumps(parameters, sort_keys=True),
        "lssf_recipe": config.to_yaml(),
        "lssf_versions": json.dumps(versions(), sort_keys=True),
    }
    os.makedirs(out_dir, exist_ok=True)
    lora.save_pretrained(out_dir)
    writer.finish(metadata)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(_readme(models, parameters, ranks, for_finetune, out_dir))


def _readme(models, parameters, ranks, for_finetune: bool, out_dir: str) -> str:
    values = sorted(ranks.values())
    scope = (
        f"This patch uses `fusion: restore`, which depends on the fine-tune: apply it to "
        f"**{models['finetuned']} only**. For another fine-tune, extract a new patch."
        if for_finetune else
        f"The term depends only on the aligned and unaligned models, so the patch repairs "
        f"any fine-tune of {models['aligned']} (it was extracted with {models['finetuned']} "
        "as the recipe's base_model, which it does not depend on)."
    )
    v = versions()
    return f"""# LSSF safety patch (PEFT LoRA adapter)

Made by mergekit-lssf {v['mergekit-lssf']} (`mergekit-lssf extract-patch`): the LSSF
safety term of every fused weight as exact LoRA factors, `B @ A` = the term, scaling 1.

- aligned model (role `aligned`): {models['aligned']}
- unaligned model (role `unaligned`): {models['unaligned']}
- fine-tune (recipe `base_model`): {models['finetuned']}
- what it adds: {fusion_words(parameters)}
- effective parameters: `{json.dumps(parameters, sort_keys=True)}`
- ranks: {len(values)} modules, min {values[0]} / median {values[len(values) // 2]} / max {values[-1]}
- versions: {', '.join(f'{k} {x}' for k, x in v.items())}

{scope}

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{models['finetuned']}")
model = PeftModel.from_pretrained(model, "{out_dir}")   # applied at load time
model = model.merge_and_unload()                      # or merged into the weights
```
"""
