"""`fusion: contrastive` against the wrong inputs, the benign-only calibration, and
mergekit-multi (issue 46): each refusal is one line before anything is written."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import load_state, run_cli
from mergekit_lssf.toy_models import ToySpec, build_toy_models


def _recipe(root, name, calibration="ft.contrastive.safetensors", base="./finetuned", aligned="./aligned", **extra):
    doc = {"merge_method": "lssf", "base_model": base,
           "models": [{"model": aligned, "parameters": {"role": "aligned"}}],
           "parameters": {"fusion": "contrastive", "calibration": calibration, "lam": 3.0, "round_to": "bfloat16"},
           "dtype": "float32", "out_dtype": "bfloat16", **extra}
    (root / name).write_text(yaml.safe_dump(doc))
    return name


def _one_line_refusal(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive-guards")
    build_toy_models(str(root), ToySpec(size="tiny", seed=7, dtype="bfloat16"))
    with open(root / "task.jsonl", "w") as fp:
        for i in range(12):
            fp.write(json.dumps({"prompt": f"say {i} in words", "answer": f"the number is {i} and that is all"}) + "\n")
    with open(root / "anchors.jsonl", "w") as fp:
        for i in range(12):
            fp.write(json.dumps({"prompt": f"how to hurt {i} people", "response": "I can't help with that."}) + "\n")
    _recipe(root, "recipe.yml")
    run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--anchors", "anchors.jsonl",
             "--out", "ft.contrastive.safetensors"], cwd=root)
    return root


def test_a_calibration_against_another_aligned_model_is_refused(toy, tmp_path):
    """The file was calibrated against ./aligned; a recipe naming another model (same
    shapes: the unaligned one) as aligned gets the fingerprint refusal, for check and merge."""
    recipe = _recipe(toy, "other-aligned.yml", aligned="./unaligned")
    for command in (["mergekit-lssf", "check", recipe], ["mergekit-yaml", recipe, str(tmp_path / "never")]):
        _one_line_refusal(run_cli(command, cwd=toy, check=False), "was calibrated on", "aligned model ./unaligned")
    assert not (tmp_path / "never").exists()


def test_a_model_that_is_not_a_local_folder_is_refused_not_skipped(toy, tmp_path):
    """calibrate reads local folders only; a recipe whose aligned model is a hub name
    (copied locally under that name would be fine) cannot be checked: refused."""
    (toy / "hub").mkdir(exist_ok=True)
    recipe = _recipe(toy, "hub.yml", aligned="someone/aligned-model")
    result = run_cli(["mergekit-lssf", "check", recipe], cwd=toy, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "someone/aligned-model" in result.stderr.strip().splitlines()[-1]


def test_slices_that_move_the_fine_tunes_layers_are_refused(toy, tmp_path):
    """The contrastive file is keyed by the fine-tune's tensor names: the fine-tune's
    layer 1 written as output layer 0 would get layer 0's basis. Layers in place pass."""
    def sliced(name, layer_range):
        return _recipe(toy, name, base=None, **{"slices": [{"sources": [
            {"model": "./finetuned", "layer_range": layer_range},
            {"model": "./aligned", "layer_range": layer_range, "parameters": {"role": "aligned"}}]}],
            "base_model": "./finetuned"})

    docs = {}
    for name, layer_range in (("in-place.yml", [0, 2]), ("moved.yml", [1, 2])):
        path = sliced(name, layer_range)
        doc = yaml.safe_load((toy / path).read_text())
        doc.pop("models")
        (toy / path).write_text(yaml.safe_dump(doc))
        docs[name] = path
    run_cli(["mergekit-lssf", "check", docs["in-place.yml"]], cwd=toy)
    _one_line_refusal(run_cli(["mergekit-lssf", "check", docs["moved.yml"]], cwd=toy, check=False),
                      "the fine-tune (base_model)'s layers 1..2 go to output layers 0..1")


def test_benign_only_calibration_says_so_and_merges(toy, tmp_path):
    """Without --task: the shipped benign prompts answered by the fine-tune. The output
    and the file say "benign-only"; the merge runs and moves every fused weight."""
    root = tmp_path / "benign"
    root.mkdir()
    for name in ("finetuned", "aligned"):
        shutil.copytree(toy / name, root / name)
    shutil.copy(toy / "anchors.jsonl", root / "anchors.jsonl")
    recipe = _recipe(root, "recipe.yml", calibration="benign.safetensors")
    done = run_cli(["mergekit-lssf", "calibrate", recipe, "--anchors", "anchors.jsonl", "--out", "benign.safetensors",
                    "--max-rank", "8"], cwd=root)
    assert "benign-only" in done.stdout + done.stderr
    with safe_open(str(root / "benign.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["task"] == "benign-only" and int(meta["task_rows"]) > 0
    run_cli(["mergekit-yaml", recipe, "out"], cwd=root)
    merged, ft = load_state(root / "out"), load_state(root / "finetuned")
    fused = [n for n in merged if ".layers." in n and n.endswith("proj.weight")]
    assert fused and all(not torch.equal(merged[n], ft[n]) for n in fused)


def test_mergekit_multi_checks_and_writes_the_same_bits(toy, tmp_path):
    """A contrastive document in a mergekit-multi file: `check` reads it, and the
    output equals mergekit-yaml's bit for bit."""
    recipe = _recipe(toy, "multi-source.yml")
    doc = yaml.safe_load((toy / recipe).read_text())
    (toy / "multi.yml").write_text(yaml.safe_dump({**doc, "name": "repaired"}))
    run_cli(["mergekit-lssf", "check", "multi.yml"], cwd=toy)
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "yaml")], cwd=toy)
    run_cli(["mergekit-multi", "multi.yml", "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "unused")],
            cwd=toy)
    by_yaml, by_multi = load_state(tmp_path / "yaml"), load_state(tmp_path / "inter" / "repaired")
    assert by_yaml.keys() == by_multi.keys()
    assert all(torch.equal(by_yaml[n], by_multi[n]) for n in by_yaml)


def test_a_stale_or_incomplete_lora_merge_cache_is_refused(toy, tmp_path):
    """mergekit reuses `cache/{BASE}_{LORA}` whenever the folder exists: an adapter
    retrained in place, or a merge cut short, would be used silently. Both refused by
    the merge and by calibrate, naming the folder, before anything is written."""
    import os
    import time

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path / "lora"
    root.mkdir()
    for name in ("finetuned", "aligned", "unaligned"):
        (root / name).symlink_to(toy / name)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(toy / "finetuned"), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        str(root / "adapter"))
    doc = {"merge_method": "lssf", "base_model": "./finetuned+./adapter",
           "models": [{"model": "./aligned", "parameters": {"role": "aligned"}},
                      {"model": "./unaligned", "parameters": {"role": "unaligned"}}],
           "parameters": {"rank": 2}, "dtype": "float32"}
    (root / "r.yml").write_text(yaml.safe_dump(doc))
    run_cli(["mergekit-yaml", "r.yml", "first", "--lora-merge-cache", "cache"], cwd=root)
    (cached,) = (root / "cache").iterdir()

    later = time.time() + 5
    for weights in (root / "adapter").glob("*.safetensors"):
        os.utime(weights, (later, later))  # the adapter, retrained in place
    _one_line_refusal(run_cli(["mergekit-yaml", "r.yml", "second", "--lora-merge-cache", "cache"], cwd=root,
                              check=False), "is newer than its merge in the LoRA merge cache", cached.name)
    assert not (root / "second").exists()

    for weights in cached.glob("*.safetensors"):
        weights.unlink()  # a merge cut short
    _one_line_refusal(run_cli(["mergekit-yaml", "r.yml", "third", "--lora-merge-cache", "cache"], cwd=root,
                              check=False), "is incomplete", cached.name)
    _recipe(root, "c.yml", base="./finetuned+./adapter")
    (root / "task.jsonl").write_text((toy / "task.jsonl").read_text())
    _one_line_refusal(run_cli(["mergekit-lssf", "calibrate", "c.yml", "--task", "task.jsonl", "--out", "c.safetensors",
                               "--lora-merge-cache", "cache"], cwd=root, check=False), "is incomplete")
    assert not (root / "third").exists() and not (root / "c.safetensors").exists()
