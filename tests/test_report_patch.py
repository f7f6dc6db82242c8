"""mergekit-lssf report and extract-patch on generated tiny models."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_lssf.toy_models import ToySpec, build_toy_models
from helpers import load_state, run_cli, write_lssf_recipe
from reference import reference_rank

from mergekit_lssf.plan import plan_recipe

PARAMS = {"alpha": [{"filter": "mlp", "value": 0.7}, {"value": 1.0}], "eta": 0.85, "weight_max": 1.5, "fusion": "add",
          "max_rank": [{"filter": "k_proj", "value": 2}, {"value": 256}]}


def _write_recipe(directory, base="./finetuned"):
    return write_lssf_recipe(directory, f"recipe-{os.path.basename(base)}.yml", PARAMS, base=base)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch")
    build_toy_models(str(root), ToySpec(size="tiny", seed=11, planted_rank=6))
    # a second fine-tune of the same aligned model: another task drift
    state = load_file(root / "finetuned" / "model.safetensors")
    g = torch.Generator().manual_seed(99)
    other = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v) for k, v in state.items()}
    (root / "finetuned2").mkdir()
    for f in os.listdir(root / "finetuned"):
        if f != "model.safetensors":
            (root / "finetuned2" / f).write_bytes((root / "finetuned" / f).read_bytes())
    save_file(other, root / "finetuned2" / "model.safetensors", metadata={"format": "pt"})
    return root


def test_report_matches_reference_and_writes_pictures(models, tmp_path):
    recipe = _write_recipe(models)
    run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "rep")], cwd=models)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    al = load_file(models / "aligned" / "model.safetensors")
    un = load_file(models / "unaligned" / "model.safetensors")
    assert report["summary"]["tensors"] == len(report["tensors"]) == 14
    for row in report["tensors"]:
        s = np.linalg.svd((al[row["name"]] - un[row["name"]]).double().numpy(), compute_uv=False)
        max_rank = 2 if "k_proj" in row["name"] else 256
        r, share = reference_rank(s, 0.85, max_rank)
        assert (row["rank"], row["max_rank"], row["eta"]) == (r, max_rank, 0.85), row["name"]
        assert row["entropy_share"] == pytest.approx(share, rel=1e-6)
        assert row["sigma_1"] == pytest.approx(s[0], rel=1e-6)
        assert row["capped"] == ("k_proj" in row["name"] and row["entropy_rank"] > 2)
        assert row["layer"] in (0, 1) and row["module"].count(".") == 1
    csv_lines = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 15 and csv_lines[0].startswith("name,layer,module,shape,rank")
    import matplotlib.image

    for png in ("rank_heatmap.png", "entropy_curves.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(tmp_path / "rep" / png)
        assert image.shape[0] > 100 and image.shape[1] > 100


def _peft_model(model_dir, patch_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, patch_dir)


def test_patch_round_trip_through_peft(models, tmp_path):
    patch = tmp_path / "patch"
    run_cli(["mergekit-lssf", "extract-patch", _write_recipe(models), "--out", str(patch)], cwd=models)
    config = json.loads((patch / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 14
    assert all(config["rank_pattern"][k] == config["alpha_pattern"][k] for k in config["rank_pattern"])
    adapter = load_file(patch / "adapter_model.safetensors")
    for key, a in adapter.items():  # balanced: ||B[:, i]|| == ||A[i, :]||
        if key.endswith("lora_A.weight"):
            b = adapter[key.replace("lora_A", "lora_B")]
            torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-7)
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", "")
            assert a.shape[0] == config["rank_pattern"][name.replace(".", "\\.")]

    for finetune in ("finetuned", "finetuned2"):
        merged_dir = tmp_path / f"merged-{finetune}"
        run_cli(["mergekit-yaml", _write_recipe(models, f"./{finetune}"), str(merged_dir)], cwd=models)
        expected = load_state(merged_dir)
        model = _peft_model(models / finetune, patch)
        tokens = torch.tensor([[1, 5, 17, 42, 7, 9, 3]])
        with torch.no_grad():
            unmerged_logits = model(tokens).logits
            merged = model.merge_and_unload()
            merged_logits = merged(tokens).logits
        state = merged.state_dict()
        for name, tensor in expected.items():
            got = state[name]
            rel = (got - tensor).norm() / tensor.norm().clamp(min=1e-12)
            assert rel < 1e-4, (finetune, name, float(rel))
        torch.testing.assert_close(unmerged_logits, merged_logits, rtol=1e-4, atol=1e-4)
        from transformers import AutoModelForCausalLM

        mergekit_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(mergekit_model(tokens).logits, merged_logits, rtol=1e-4, atol=1e-4)


def test_patch_streams_one_module_at_a_time(models, tmp_path, monkeypatch):
    """extract-patch writes each module's factors before the next weight is computed,
    so memory holds one weight's factors whatever the depth; the file equals the one
    the factors give, and a failure before the first write leaves no folder."""
    import mergekit_lssf.patch as patch_module
    from mergekit_lssf.kernel import balanced_factors
    from mergekit_lssf.recipe import load_recipe
    from mergekit_lssf.safetensors_io import StreamedWriter

    events, factors = [], {}
    produce = patch_module.fused_factors

    def fused_factors(config, **kwargs):
        for tensor in produce(config, **kwargs):
            events.append("factors")
            factors[tensor.name.removesuffix(".weight")] = tensor
            yield tensor

    add = StreamedWriter.add
    monkeypatch.setattr(patch_module, "fused_factors", fused_factors)
    monkeypatch.setattr(StreamedWriter, "add", lambda self, tensors: events.append("add") or add(self, tensors))
    monkeypatch.chdir(models)
    monkeypatch.setenv("MERGEKIT_LSSF_ROLE_CHECK", "0")
    ranks = patch_module.extract_patch(plan_recipe(load_recipe(_write_recipe(models))), str(tmp_path / "p"))
    assert events == ["factors", "add"] * len(ranks) and len(ranks) == 14
    adapter = load_file(tmp_path / "p" / "adapter_model.safetensors")
    for module, tensor in factors.items():
        b, a = balanced_factors(tensor.factors.left, tensor.factors.right, tensor.parameters["alpha"])
        assert torch.equal(adapter[f"base_model.model.{module}.lora_A.weight"], a)
        assert torch.equal(adapter[f"base_model.model.{module}.lora_B.weight"], b)
    assert not [f for f in os.listdir(tmp_path / "p") if f.startswith(".lssf-parts")]

    from mergekit_lssf import LSSFConfigError

    zero = write_lssf_recipe(models, "recipe-zero.yml", {**PARAMS, "alpha": 0.0})
    with pytest.raises(LSSFConfigError, match=r"0 < alpha <= 2, got 0.0"):  # alpha 0 patches nothing: refused
        patch_module.extract_patch(plan_recipe(load_recipe(zero)), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_relative_paths_from_another_folder_read_that_folders_models(tmp_path, monkeypatch):
    """mergekit's process-wide loader cache is keyed by the path as written: the same
    relative recipe run from a second folder must read the second folder's models."""
    from mergekit_lssf.recipe import load_recipe
    from mergekit_lssf.traversal import fused_factors

    monkeypatch.setenv("MERGEKIT_LSSF_ROLE_CHECK", "0")
    ranks = {}
    for seed in (1, 2):
        root = tmp_path / f"toy{seed}"
        build_toy_models(str(root), ToySpec(size="tiny", seed=seed, planted_rank=2 + 3 * seed))
        recipe = write_lssf_recipe(str(root), "r.yml", {"fusion": "add"})
        monkeypatch.chdir(root)
        ranks[seed] = {t.name: t.factors.info.rank for t in fused_factors(plan_recipe(load_recipe(recipe)), quiet=True, factors=False)}
        absolute = write_lssf_recipe(str(root), "abs.yml", {"fusion": "add"}, base=str(root / "finetuned"))
        doc = (root / absolute).read_text().replace("./aligned", str(root / "aligned")).replace("./unaligned", str(root / "unaligned"))
        (root / absolute).write_text(doc)
        fresh = {t.name: t.factors.info.rank for t in fused_factors(plan_recipe(load_recipe(absolute)), quiet=True, factors=False)}
        assert ranks[seed] == fresh, seed
    assert ranks[1] != ranks[2]
