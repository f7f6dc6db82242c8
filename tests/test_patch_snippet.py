"""The PEFT loading code of a safety patch runs as written (issue 49, finding 9).

``extract-patch`` writes README.md with a Python snippet; docs/commands.md shows the same
code with placeholder paths. Both are executed here, in a fresh interpreter, on tiny toy
models: the generated one as written, from the folder extract-patch ran in (for a plain
fine-tune and for the README's ``model+lora`` fine-tune), the documented one with its
placeholders replaced by a user's paths; the loaded model must hold mergekit-yaml's
weights for the same recipe."""

import os
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import load_state, run_cli, write_lssf_recipe
from mergekit_lssf.toy_models import ToySpec, build_toy_models

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
ENV = {"MERGEKIT_LSSF_ROLE_CHECK": "0"}
SAVE = """
import torch
from safetensors.torch import save_file
save_file({k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}, "loaded.safetensors")
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Toy unaligned/aligned/finetuned models and ./lora, a PEFT LoRA fine-tune of ./aligned."""
    root = tmp_path_factory.mktemp("snippet")
    build_toy_models(str(root), ToySpec(size="tiny", seed=5, planted_rank=3))
    aligned = AutoModelForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    torch.manual_seed(3)
    lora = get_peft_model(aligned, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                              init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    return root


def _python_block(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def _run_snippet(code: str, cwd) -> dict:
    """Execute ``code`` (then save ``model``'s state) in a fresh interpreter in ``cwd``."""
    result = subprocess.run([sys.executable, "-c", code + SAVE], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"the snippet failed as written:\n{code}\n{result.stderr[-3000:]}"
    return load_file(os.path.join(cwd, "loaded.safetensors"))


def _same_weights(loaded: dict, merged_dir) -> None:
    expected = load_state(merged_dir)
    for name, tensor in expected.items():
        got = loaded[name]
        rel = float((got - tensor.float()).norm() / tensor.float().norm().clamp(min=1e-12))
        assert rel < 1e-4, (name, rel)


CASES = {"full-finetune": ("./finetuned", "add"), "model+lora": ("./aligned+./lora", "restore")}


@pytest.fixture(scope="module")
def patches(models):
    """Per case: extract-patch and mergekit-yaml of the same recipe, run in ``models``."""
    out = {}
    for i, (case, (base, fusion)) in enumerate(CASES.items()):
        recipe = write_lssf_recipe(str(models), f"case{i}.yml", {"fusion": fusion}, base=base)
        cache = ["--lora-merge-cache", "lora-cache"]
        run_cli(["mergekit-lssf", "extract-patch", recipe, "--out", f"patch{i}", *cache], cwd=models, env=ENV)
        run_cli(["mergekit-yaml", recipe, f"merged{i}", *cache], cwd=models, env=ENV)
        out[case] = (models / f"patch{i}", models / f"merged{i}")
    return out


@pytest.mark.parametrize("case", CASES)
def test_generated_snippet_loads_the_patch_as_written(models, patches, case):
    patch, merged = patches[case]
    snippet = _python_block((patch / "README.md").read_text())
    _same_weights(_run_snippet(snippet, models), merged)


def test_documented_snippet_loads_with_a_users_paths(models, patches, tmp_path):
    """docs/commands.md's code with "./my-finetune" and "safety-patch/" replaced by the
    user's folders, run from elsewhere; for the model+lora fine-tune, its commented
    line used instead, with MODEL and LORA replaced."""
    with open(os.path.join(ROOT, "docs", "commands.md"), encoding="utf-8") as fp:
        doc = fp.read()
    section = doc.split("## `mergekit-lssf extract-patch`", 1)[1].split("\n## ", 1)[0]
    code = _python_block(section)
    assert "./my-finetune" in code and "safety-patch/" in code
    patch, merged = patches["full-finetune"]
    plain = code.replace("./my-finetune", str(models / "finetuned")).replace("safety-patch/", str(patch))
    _same_weights(_run_snippet(plain, tmp_path), merged)

    lines = code.splitlines()
    commented = [i for i, line in enumerate(lines) if line.startswith("# model = PeftModel.from_pretrained(")]
    assert len(commented) == 1, "the documented snippet shows no model+lora line"
    lines[commented[0]] = lines[commented[0]].removeprefix("# ")
    patch, merged = patches["model+lora"]
    lora_code = ("\n".join(lines) + "\n").replace('"MODEL"', repr(str(models / "aligned"))) \
        .replace('"LORA"', repr(str(models / "lora"))).replace("./my-finetune", str(models / "aligned")) \
        .replace("safety-patch/", str(patch))
    _same_weights(_run_snippet(lora_code, tmp_path), merged)
