"""mergekit-yaml, mergekit-multi and mergekit-lssf in subprocesses, as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import load_state, run_cli, write_lssf_recipe
from reference import reference_fuse

from mergekit_lssf.toy_models import ToySpec, build_toy_models

def test_fresh_process_registration_without_heavy_imports():
    code = (
        "import sys; heavy = [m for m in ('torch', 'mergekit', 'mergekit_lssf') if m in sys.modules]; "
        "import mergekit.merge_methods as mm; print(heavy, mm.get('lssf').spec.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] lssf"


def _expected_parameters(name):
    """The recipe below, resolved by hand: filters first, gradients over 2 layers."""
    layer = int(name.split(".")[2])
    alpha = 0.5 if "mlp" in name else [0.2, 1.0][layer]
    max_rank = 2 if "self_attn" in name else 256
    return dict(alpha=alpha, eta=0.8, max_rank=max_rank, weight_max=1.5)


def test_mergekit_yaml_filters_and_gradients_match_reference(toy_dir, tmp_path):
    """No `fusion` in the recipe: the default, `restore`, against the float64 reference."""
    params = {
        "alpha": [{"filter": "mlp", "value": 0.5}, {"value": [0.2, 1.0]}],
        "eta": 0.8,
        "max_rank": [{"filter": "self_attn", "value": 2}, {"value": 256}],
        "weight_max": 1.5,
    }
    recipe = write_lssf_recipe(toy_dir, "filters.yml", params)
    out = tmp_path / "merged"
    result = run_cli(["mergekit-yaml", recipe, str(out), "-v"], cwd=toy_dir)
    assert "lssf: fused 14 tensors (7 kept from the fine-tune)" in result.stderr
    assert "entropy share" in result.stderr  # per-tensor log at -v
    merged, ft = load_state(out), load_state(toy_dir / "finetuned")
    al, un = load_state(toy_dir / "aligned"), load_state(toy_dir / "unaligned")
    assert set(merged) == set(ft)
    fused = 0
    for name, tensor in merged.items():
        if tensor.ndim == 2 and "embed" not in name and "lm_head" not in name:
            ref, r = reference_fuse(ft[name].numpy(), al[name].numpy(), un[name].numpy(), fusion="restore", **_expected_parameters(name))
            assert np.linalg.norm(tensor.double().numpy() - ref) / np.linalg.norm(ref) < 1e-5, name
            fused += 1
        else:
            assert torch.equal(tensor, ft[name]), name
    assert fused == 14
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).vocab_size == AutoConfig.from_pretrained(toy_dir / "finetuned").vocab_size
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(toy_dir / "finetuned").chat_template


def test_finetune_with_added_tokens_merges(tmp_path):
    build_toy_models(str(tmp_path), ToySpec(size="tiny", extra_tokens=8, seed=3))
    recipe = write_lssf_recipe(tmp_path, "r.yml", {"alpha": 1.0})
    run_cli(["mergekit-yaml", recipe, "merged"], cwd=tmp_path)
    merged, ft = load_state(tmp_path / "merged"), load_state(tmp_path / "finetuned")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == ft[name].shape[0] == 384 + 8
        assert torch.equal(merged[name], ft[name])
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 392


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["models"][1]["parameters"].update(role="aligned"), "exactly one model with `role: aligned`"),
        (lambda d: d.pop("base_model"), "requires the recipe field `base_model`"),
        (lambda d: d["parameters"].update(eta=0), "parameters.eta: lssf parameter `eta` must satisfy 0 < eta <= 1"),
        (lambda d: d["parameters"].update(subspace="s.safetensors"), "parameters.subspace"),
        (lambda d: d["parameters"].update(alpah=1.0), "unknown lssf parameter `alpah`"),
    ],
)
def test_bad_recipe_exits_nonzero_before_writing(toy_dir, tmp_path, mutate, message):
    name = write_lssf_recipe(toy_dir, "bad.yml", {"alpha": 1.0})
    with open(toy_dir / name) as fp:
        doc = yaml.safe_load(fp)
    mutate(doc)
    with open(toy_dir / name, "w") as fp:
        yaml.safe_dump(doc, fp)
    out = tmp_path / "merged"
    result = run_cli(["mergekit-yaml", name, str(out)], cwd=toy_dir, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not out.exists() or not any(f.endswith(".safetensors") for f in os.listdir(out))


def test_shape_mismatch_and_nan_name_the_model(tmp_path):
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=4))
    from safetensors.torch import save_file

    path = tmp_path / "unaligned" / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(state, path)
    recipe = write_lssf_recipe(tmp_path, "r.yml", {"alpha": 1.0})
    result = run_cli(["mergekit-yaml", recipe, "merged"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "tensor model.layers.1.mlp.up_proj.weight has shape [160, 64] in the fine-tuned" in result.stderr
    assert "[159, 64] in the unaligned model (./unaligned)" in result.stderr

    state["model.layers.1.mlp.up_proj.weight"] = load_file(tmp_path / "aligned" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, path)
    result = run_cli(["mergekit-yaml", recipe, "merged2"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "model.layers.0.self_attn.o_proj.weight of the unaligned model (./unaligned) has 1 non-finite" in result.stderr
    assert not (tmp_path / "merged2" / "model.safetensors").exists()


def test_demo_command(tmp_path):
    result = run_cli(["mergekit-lssf", "demo", "--size", "tiny", "--workdir", str(tmp_path / "demo")], cwd=tmp_path)
    summary = [l for l in result.stdout.splitlines() if l.startswith("Planted safety delta")]
    assert summary, result.stdout
    restored = float(summary[0].split("LSSF output ")[1].split(";")[0])
    assert restored > 0.9
    assert "Tensors that are not fused and differ from the fine-tune: 0" in result.stdout


def test_demo_calibrated_command(tmp_path):
    result = run_cli(["mergekit-lssf", "demo", "--size", "tiny", "--calibrated", "--workdir", str(tmp_path / "demo")], cwd=tmp_path)
    assert "-> subspace.safetensors" in result.stdout and "Planted safety delta present" in result.stdout
    assert (tmp_path / "demo" / "merged" / "model.safetensors").exists()
    # the printed ranks are the calibrated merge's, as `report` computes them
    printed = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("model.layers.")}
    run_cli(["mergekit-lssf", "report", "demo-calibrated.yml", "--out", "rep"], cwd=tmp_path / "demo")
    report = json.loads((tmp_path / "demo" / "rep" / "report.json").read_text())
    assert printed == {row["name"]: row["rank"] for row in report["tensors"]} and len(printed) == 14


def test_mergekit_multi_stage_then_lssf(toy_dir, tmp_path):
    """Stage 1 (task_arithmetic, weight 1 on the fine-tune) reproduces the fine-tune;
    stage 2 (lssf) on it must equal lssf on the fine-tune directly."""
    stage1 = {
        "name": "stage1",
        "merge_method": "task_arithmetic",
        "base_model": "./aligned",
        "models": [{"model": "./finetuned", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    stage2 = yaml.safe_load(open(toy_dir / write_lssf_recipe(toy_dir, "direct.yml", {"alpha": 0.9, "eta": 0.85})))
    direct = yaml.safe_load(open(toy_dir / "direct.yml"))
    stage2["base_model"] = "stage1"
    with open(toy_dir / "multi.yml", "w") as fp:
        yaml.safe_dump_all([stage1, stage2], fp)
    run_cli(["mergekit-multi", "multi.yml", "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "multi")], cwd=toy_dir)
    run_cli(["mergekit-yaml", "direct.yml", str(tmp_path / "direct")], cwd=toy_dir)
    multi, single = load_state(tmp_path / "multi"), load_state(tmp_path / "direct")
    assert direct["parameters"] == stage2["parameters"]
    for name in single:
        assert torch.allclose(multi[name], single[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(toy_dir, tmp_path):
    recipe = write_lssf_recipe(toy_dir, "cuda.yml", {"alpha": 1.0})
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "cpu")], cwd=toy_dir)
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "gpu"), "--cuda"], cwd=toy_dir)
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    for name in cpu:
        assert (cpu[name] - gpu[name]).norm() / cpu[name].norm().clamp(min=1e-12) < 1e-3, name
