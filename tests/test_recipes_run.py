"""Every shipped recipe runs: each is merged, as written, on generated bf16 models of its
own architecture (Llama for the Llama recipes, Qwen2 for the Qwen ones), with a real PEFT
adapter where it says ``model+lora``; each commented alternative ("replace the alpha line
above with ...") is merged too, so that following a comment gives a valid recipe."""

import glob
import os
import re
import shutil

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from helpers import load_state, run_cli
from mergekit_lssf.check import check
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.toy_models import ToySpec, build_toy_models

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
#: the shipped lssf recipes (interpolate-baseline.yml is mergekit's `linear`, run by test_walkthrough)
RECIPES = [p for p in sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yml")))
           if "merge_method: lssf" in open(p, encoding="utf-8").read()]
# what each model a recipe names stands for, longest first (Llama-3.1-8B-Instruct before Llama-3.1-8B)
STANDS_FOR = [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama/aligned"), ("meta-llama/Llama-3.1-8B", "llama/unaligned"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen/aligned"), ("Qwen/Qwen2.5-7B", "qwen/unaligned"),
    ("./llama31-8b-instruct-harmful-ft", "llama/harmful-ft"), ("./my-finetune", "llama/finetuned"),
    ("./finetune-math", "llama/finetuned"), ("./finetune-code", "llama/finetune-2"),
]


def _perturbed(source: str, out: str, scale: float, seed: int) -> None:
    """A copy of model folder ``source`` at ``out`` with every 2-D weight moved by a
    random low-rank step of relative size ``scale`` (stored in bf16)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                step = torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g)
                p += scale * p.norm() * step / step.norm()
    model.to(torch.bfloat16).save_pretrained(out)
    for f in os.listdir(source):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(source, f), out)


def _qwen(llama: str, out: str) -> None:
    """Qwen2-architecture unaligned and aligned models (q/k/v biases, tied sizes as the
    Llama toy's), with the Llama toy's tokenizer."""
    c = AutoModelForCausalLM.from_pretrained(os.path.join(llama, "unaligned")).config
    config = Qwen2Config(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size, tie_word_embeddings=False)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(os.path.join(out, "base"))
    for f in os.listdir(os.path.join(llama, "unaligned")):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(llama, "unaligned", f), os.path.join(out, "base"))
    _perturbed(os.path.join(out, "base"), os.path.join(out, "unaligned"), 0.0, 0)
    _perturbed(os.path.join(out, "unaligned"), os.path.join(out, "aligned"), 0.2, 2)


def _lora(aligned: str, out: str) -> None:
    """A PEFT LoRA adapter of ``aligned`` with nonzero factors (a fine-tune's)."""
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    build_toy_models(str(root / "llama"), ToySpec(dtype="bfloat16"))
    _perturbed(str(root / "llama" / "aligned"), str(root / "llama" / "harmful-ft"), 0.1, 3)
    _perturbed(str(root / "llama" / "aligned"), str(root / "llama" / "finetune-2"), 0.03, 4)
    _qwen(str(root / "llama"), str(root / "qwen"))
    for arch in ("llama", "qwen"):
        _lora(str(root / arch / "aligned"), str(root / arch / "lora"))
    return root


def _localised(text: str, root, arch: str) -> str:
    for name, folder in STANDS_FOR:
        text = text.replace(name, str(root / folder))
    return text.replace("./my-lora", str(root / arch / "lora"))


def _variants(text: str):
    """The recipe as shipped, then once per commented alternative: a comment line
    ``# KEY: VALUE`` whose KEY is set on an active line of the same indentation replaces
    that line."""
    yield "as shipped", text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)# (\w+): (.+)$", line)
        if not m:
            continue
        indent, key, _ = m.groups()
        active = [j for j, x in enumerate(lines) if re.match(rf"^{indent}{key}:", x)]
        if active:
            variant = list(lines)
            variant[active[0]] = f"{indent}{key}: {m.group(3)}"
            yield f"with line {i + 1} uncommented", "\n".join(variant) + "\n"


def _finetune(doc: dict, root, arch: str):
    """The fine-tune a recipe stage repairs, as float32 tensors (``model+lora`` merged by PEFT)."""
    base = doc["base_model"]
    if "+" not in base:
        return {k: v.float() for k, v in load_state(base).items()}
    model, adapter = base.split("+")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter)
    return {k: v.detach() for k, v in merged.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_shipped_recipe_runs_on_its_architecture(path, models, tmp_path):
    arch = "qwen" if "qwen" in os.path.basename(path) else "llama"
    with open(path, encoding="utf-8") as fp:
        shipped = fp.read()
    for label, text in _variants(_localised(shipped, models, arch)):
        recipe, out = tmp_path / "recipe.yml", tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        recipe.write_text(text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        if len(docs) > 1:  # a mergekit-multi recipe
            run_cli(["mergekit-multi", str(recipe), "-I", str(tmp_path / "inter"), "--out-path", str(out)], cwd=tmp_path)
            ft = {k: v.float() for k, v in load_state(tmp_path / "inter" / docs[0]["name"]).items()}
        else:
            run_merge(MergeConfiguration.model_validate(docs[0]), str(out),
                      MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "lora-cache")))
            ft = _finetune(docs[0], models, arch)
        lssf = docs[-1]
        aligned = load_state(lssf["models"][0]["model"])
        got = load_state(out)
        assert got and all(t.dtype == torch.bfloat16 for t in got.values()), (label, "out_dtype bfloat16")
        fused = [n for n in got if n.endswith("proj.weight")]
        moved = sum(float((got[n].float() - ft[n]).norm()) for n in fused)
        assert moved > 0, f"{os.path.basename(path)} {label}: nothing fused"
        if lssf.get("parameters", {}).get("fusion", "restore") == "restore":
            before = sum(float((ft[n] - aligned[n].float()).norm() ** 2) for n in fused)
            after = sum(float((got[n].float() - aligned[n].float()).norm() ** 2) for n in fused)
            assert after < before, f"{os.path.basename(path)} {label}: restore did not move toward the aligned model"


def test_a_lora_recipe_without_a_merge_cache_is_one_line(models, tmp_path):
    """mergekit 0.1.5 merges ``model+lora`` only with --lora-merge-cache; without it the
    merge, report and extract-patch stop in one line naming base_model, before writing."""
    text = _localised(open(os.path.join(ROOT, "recipes", "llama31-8b-lora.yml"), encoding="utf-8").read(), models, "llama")
    (tmp_path / "recipe.yml").write_text(text)
    for args in (["mergekit-yaml", "recipe.yml", "out"], ["mergekit-lssf", "report", "recipe.yml", "--out", "out"],
                 ["mergekit-lssf", "extract-patch", "recipe.yml", "--out", "out"]):
        done = run_cli(args, cwd=tmp_path, check=False)
        assert done.returncode == 1, (args, done.stderr[-2000:])
        lines = [x for x in done.stderr.splitlines() if "error" in x.lower()]
        assert lines and "base_model" in lines[-1] and "--lora-merge-cache" in lines[-1], (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists(), args
    done = run_cli(["mergekit-lssf", "report", "recipe.yml", "--out", "report", "--lora-merge-cache", "cache"], cwd=tmp_path)
    assert (tmp_path / "report" / "report.json").exists()


def test_check_of_a_lora_recipe_reads_shapes_under_the_adapter(models, tmp_path):
    """``check`` on ``model+lora`` reads the shapes of the model under the adapter (a LoRA
    merge keeps every shape), so 1-D tensors are listed as kept, not as fused with shape ``?``."""
    text = _localised(open(os.path.join(ROOT, "recipes", "llama31-8b-lora.yml"), encoding="utf-8").read(), models, "llama")
    (tmp_path / "recipe.yml").write_text(text)
    result = check(plan_recipe(load_recipe(str(tmp_path / "recipe.yml")), needs_weights=False))
    plain = load_state(models / "llama" / "aligned")
    assert {r["name"] for r in result["fused"]} == {n for n, t in plain.items() if n.endswith("proj.weight")}
    assert all(r["shape"] == list(plain[r["name"]].shape) for r in result["fused"])
    assert any("shapes read from" in w for w in result["warnings"])
