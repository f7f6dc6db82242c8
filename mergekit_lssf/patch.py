"""``mergekit-lssf extract-patch``: the safety term as a PEFT LoRA adapter.

With ``fusion: add`` (the paper's rule) the fused term ``alpha * P' delta`` has rank r per
weight and depends only on the aligned and unaligned models, not on the fine-tune.
Written as a LoRA adapter (``B @ A = alpha * P' delta`` exactly, balanced factors,
scaling 1 through ``rank_pattern``/``alpha_pattern``), it repairs any fine-tune of the
aligned model at load time, in a multi-LoRA server, or merged with
``merge_and_unload()``. With ``fusion: restore`` (the default) the term ``alpha * P' (W_aligned -
W_ft)`` depends on the fine-tune: the adapter is for the recipe's ``base_model`` only,
and its config, metadata and README say so.

Each weight's factors are those of its ``d_out x d_in`` form (``layout.py``): for
GPT-2-style ``Conv1D`` weights, stored ``d_in x d_out``, the adapter sets PEFT's
``fan_in_fan_out``, so that ``merge_and_unload()`` adds ``(B @ A)^T`` to the stored weight.

The adapter carries its provenance: safetensors metadata (``lssf_*`` keys) and a
README.md with the models, the effective parameters, the ranks and the versions.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict

import torch
from peft import LoraConfig

from mergekit_lssf.kernel import balanced_factors
from mergekit_lssf.layout import CONV1D, parameter_layout
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.provenance import fusion_words, roles, versions
from mergekit_lssf.plan import LSSFPlan
from mergekit_lssf.safetensors_io import StreamedWriter
from mergekit_lssf.traversal import fused_factors

PREFIX = "base_model.model."
#: The files ``extract_patch`` writes (an output folder holding any of them is refused).
OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def extract_patch(plan: LSSFPlan, out_dir: str, *, cuda: bool = False, dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Write adapter_config.json and adapter_model.safetensors; returns rank per module.

    The factors are streamed to the adapter file one module at a time (part files,
    then one file: PEFT loads a single ``adapter_model.safetensors``), so memory holds
    one weight's factors whatever the depth."""
    created = not os.path.exists(out_dir)
    writer = StreamedWriter(os.path.join(out_dir, "adapter_model.safetensors"))
    try:
        ranks, fusions, fan_in_fan_out = _stream_factors(plan, writer, cuda, dtype)
        _finish(plan, out_dir, writer, ranks, fusions, fan_in_fan_out)
    finally:
        writer.close()
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):  # failed before writing
            os.rmdir(out_dir)
    return ranks


def _stream_factors(plan: LSSFPlan, writer: StreamedWriter, cuda: bool, dtype: torch.dtype):
    """Rank per module, the fusions seen and PEFT's ``fan_in_fan_out``; each module's A
    and B go to ``writer``."""
    ranks: Dict[str, int] = {}
    fusions = set()
    kinds = set()
    for tensor in fused_factors(plan, cuda=cuda):
        if tensor.expert is not None:
            raise LSSFConfigError(
                f"extract-patch: {tensor.name.rsplit('[', 1)[0]} is a stacked MoE expert weight, which a PEFT "
                "LoRA adapter cannot target; merge with mergekit-yaml instead (nothing was written)")
        fusions.add(tensor.parameters["fusion"])
        alpha = tensor.parameters["alpha"]
        left, right = tensor.factors.left, tensor.factors.right
        if left is None:
            continue
        # factors of the d_out x d_in form (traversal transposes a Conv1D weight): B @ A is
        # PEFT's delta either way; a Conv1D target only needs fan_in_fan_out (see _fan_in_fan_out)
        kinds.add(_kind(plan, tensor.name))
        b, a = balanced_factors(left, right, alpha)
        module = tensor.name.removesuffix(".weight")
        writer.add({f"{PREFIX}{module}.lora_A.weight": a.to(dtype), f"{PREFIX}{module}.lora_B.weight": b.to(dtype)})
        ranks[module] = b.shape[1]
    if not ranks:
        raise LSSFConfigError("extract-patch: nothing to patch (every fused tensor has rank 0); "
                              "nothing was written")
    return ranks, fusions, _fan_in_fan_out(kinds)


def _kind(plan: LSSFPlan, name: str) -> str:
    """``"conv1d"`` for a ``transformers`` ``Conv1D`` weight (``d_in x d_out``), else
    ``"linear"`` (an ``nn.Linear``, or a model whose class is unknown: by name)."""
    layout = parameter_layout(plan.config.base_model, name)
    return CONV1D if layout is not None and layout.kind == CONV1D else "linear"


def _fan_in_fan_out(kinds) -> bool:
    """PEFT's ``fan_in_fan_out``: True for ``Conv1D`` targets (GPT-2 family), whose base
    weight is ``d_in x d_out`` (PEFT then adds ``(B @ A)^T`` on merge; the unmerged
    forward is ``x A^T B^T`` either way). One adapter config has one value, so a model
    mixing ``Conv1D`` and ``nn.Linear`` targets is refused."""
    if kinds == {CONV1D, "linear"}:
        raise LSSFConfigError("extract-patch: this model mixes Conv1D and nn.Linear weights, which one PEFT "
                              "adapter config (one fan_in_fan_out) cannot target; merge with mergekit-yaml "
                              "instead (nothing was written)")
    return kinds == {CONV1D}


def _finish(plan: LSSFPlan, out_dir: str, writer: StreamedWriter, ranks: Dict[str, int], fusions,
            fan_in_fan_out: bool = False) -> None:
    """The adapter file's header and metadata, adapter_config.json and README.md."""
    models = roles(plan.config, plan.refs)
    parameters = plan.parameters()
    for_finetune = bool(fusions & {"restore", "contrastive"})  # their term depends on the fine-tune
    top = max(ranks.values())
    patterns = {re.escape(m): r for m, r in ranks.items()}
    lora = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),  # lora_alpha = r: scaling 1, B @ A is the term
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,  # Conv1D targets (GPT-2): weights stored d_in x d_out
        bias="none",
        task_type="CAUSAL_LM",
        # a restore patch only fits the fine-tune it was computed from
        base_model_name_or_path=models["finetuned"] if for_finetune else str(plan.aligned),
    )
    metadata = {
        "format": "pt",
        "lssf_aligned": models["aligned"],
        "lssf_unaligned": models["unaligned"],
        "lssf_finetuned": models["finetuned"],
        "lssf_applies_to": ("only " + models["finetuned"]) if for_finetune
        else "any fine-tune of " + models["aligned"],
        "lssf_parameters": json.dumps(parameters, sort_keys=True),
        "lssf_recipe": plan.config.to_yaml(),
        "lssf_versions": json.dumps(versions(), sort_keys=True),
    }
    os.makedirs(out_dir, exist_ok=True)
    lora.save_pretrained(out_dir)
    writer.finish(metadata)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(_readme(models, parameters, ranks, for_finetune, out_dir, plan.config.base_model))


def _pretrained_args(path) -> str:
    """``from_pretrained``'s arguments for a mergekit ``ModelPath`` (path, revision)."""
    revision = getattr(path, "revision", None)
    return json.dumps(path.path) + (f", revision={json.dumps(revision)}" if revision else "")


def load_snippet(finetuned, out_dir: str) -> str:
    """Python that loads the fine-tune ``finetuned`` (the recipe's ``base_model``, a
    mergekit ``ModelReference``) and applies the patch in ``out_dir``. A ``model+lora``
    fine-tune is its model with its LoRA merged (as mergekit-yaml merges it in
    ``--lora-merge-cache``); the patch is a second adapter on top. Paths are as the
    recipe and ``--out`` gave them: relative ones are from the folder extract-patch
    ran in."""
    lines = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({_pretrained_args(finetuned.model)})",
    ]
    if getattr(finetuned, "lora", None) is not None:
        lines.append(f"model = PeftModel.from_pretrained(model, {_pretrained_args(finetuned.lora)}).merge_and_unload()"
                     "  # the fine-tune: its LoRA merged")
    lines += [
        f"model = PeftModel.from_pretrained(model, {json.dumps(out_dir)})  # the safety patch, applied at load time",
        "model = model.merge_and_unload()  # optional: merged into the weights (mergekit-yaml's result)",
    ]
    return "\n".join(lines) + "\n"


def _readme(models, parameters, ranks, for_finetune: bool, out_dir: str, finetuned=None) -> str:
    values = sorted(ranks.values())
    scope = (
        f"This patch uses `fusion: {parameters['fusion']}`, which depends on the fine-tune: apply it to "
        f"**{models['finetuned']} only**. For another fine-tune, extract a new patch."
        if for_finetune else
        f"The term depends only on the aligned and unaligned models, so the patch repairs "
        f"any fine-tune of {models['aligned']} (it was extracted with {models['finetuned']} "
        "as the recipe's base_model, which it does not depend on)."
    )
    v = versions()
    snippet = load_snippet(finetuned, out_dir) if finetuned is not None else ""
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

To load it (run from the folder extract-patch ran in: relative paths are the recipe's and `--out`'s):

```python
{snippet}```
"""
