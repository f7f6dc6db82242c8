"""Which tensors LSSF fuses (``fused.kept_reason``), on names from dense and MoE
models, and a Mixtral-shaped bf16 toy merged through mergekit: routers keep the
fine-tune's values, each stacked expert is fused as its own weight."""

import os

import pytest
import torch
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_state_dicts
from mergekit.options import MergeOptions
from transformers import AutoModelForCausalLM

from helpers import load_state, write_lssf_recipe
from mergekit_lssf.check import check
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.fused import kept_reason
from mergekit_lssf.kernel import safety_factors
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.report import build_report
from mergekit_lssf.parameters import FusionSettings


@pytest.mark.parametrize("name, shape, floating, reason", [
    ("model.layers.3.self_attn.q_proj.weight", (8, 8), True, None),
    ("model.layers.3.mlp.gate_proj.weight", (16, 8), True, None),
    ("model.layers.3.block_sparse_moe.experts.2.w1.weight", (16, 8), True, None),
    ("model.layers.3.mlp.experts.5.down_proj.weight", (8, 16), True, None),
    ("model.layers.3.mlp.experts.gate_up_proj", (4, 32, 8), True, None),
    ("model.layers.3.mlp.experts.down_proj", (4, 8, 16), True, None),
    ("model.layers.3.mlp.experts.down_proj", (8, 16), True, "2-D"),
    ("model.embed_tokens.weight", (64, 8), True, "vocabulary"),
    ("lm_head.weight", (64, 8), True, "vocabulary"),
    ("model.layers.3.block_sparse_moe.gate.weight", (4, 8), True, "router"),
    ("model.layers.3.mlp.gate.weight", (4, 8), True, "router"),
    ("model.layers.3.mlp.shared_expert_gate.weight", (1, 8), True, "router"),
    ("model.layers.3.block_sparse_moe.router.layer.weight", (4, 8), True, "router"),
    ("model.layers.3.mamba.A_log", (16, 4), True, "not a weight"),
    ("model.layers.3.input_layernorm.weight", (8,), True, "1-D"),
    ("model.layers.3.mamba.conv1d.weight", (16, 1, 4), True, "3-D"),
    ("model.layers.3.self_attn.q_proj.weight", (8, 8), False, "not floating point"),
    ("model.layers.3.self_attn.q_proj.weight", None, None, None),  # hub model: by name alone
    (None, (8, 8), True, None),  # unnamed in-memory tensor: by shape alone
])
def test_kept_reason(name, shape, floating, reason):
    assert kept_reason(name, shape, floating) == reason


def test_vocabulary_axis_from_mergekit_metadata_wins():
    assert kept_reason("model.layers.0.anything.weight", (64, 8), True, vocabulary_axis=0) == "vocabulary"


def test_stacked_experts_are_fused_one_expert_at_a_time():
    """Each expert of a stacked (experts, d_out, d_in) weight merges exactly as the same
    three 2-D matrices merge as one ordinary weight."""
    g = torch.Generator().manual_seed(0)
    un = torch.randn(3, 12, 10, generator=g)
    al = un + 0.1 * torch.randn(3, 12, 4, generator=g) @ torch.randn(3, 4, 10, generator=g)
    ft = al + 0.05 * torch.randn(3, 12, 10, generator=g)
    role = {"role": {"al": "aligned", "un": "unaligned"}}
    stacked = merge_state_dicts({"ft": {"m.experts.down_proj": ft}, "al": {"m.experts.down_proj": al},
                                 "un": {"m.experts.down_proj": un}}, "lssf", base="ft", parameters=role)
    out = stacked["m.experts.down_proj"]
    assert out.shape == ft.shape and not torch.equal(out, ft)
    for e in range(3):
        one = merge_state_dicts({"ft": {"w.weight": ft[e]}, "al": {"w.weight": al[e]}, "un": {"w.weight": un[e]}},
                                "lssf", base="ft", parameters=role)["w.weight"]
        torch.testing.assert_close(out[e], one, rtol=0, atol=0)


def _mixtral(path, seed, base=None, scale=0.0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    unaligned = _mixtral(root / "unaligned", 0)
    aligned = _mixtral(root / "aligned", 1, unaligned, 0.02)
    _mixtral(root / "finetuned", 2, aligned, 0.01)
    return root


def test_moe_toy_check_and_merge(moe_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(moe_dir)
    monkeypatch.setenv("MERGEKIT_LSSF_ROLE_CHECK", "0")
    recipe = write_lssf_recipe(str(moe_dir), "recipe.yml", {"round_to": "bfloat16"}, out_dtype="bfloat16")
    result = check(plan_recipe(load_recipe(recipe), needs_weights=False))
    kept = {row["name"]: row["reason"] for row in result["kept"]}
    fused = {row["name"] for row in result["fused"]}
    assert kept["model.layers.0.mlp.gate.weight"] == "router"
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
            "model.layers.1.self_attn.q_proj.weight"} <= fused

    out = tmp_path / "merged"
    run_merge(load_recipe(recipe), str(out), MergeOptions(quiet=True))
    merged, ft_files = load_state(str(out)), os.listdir(moe_dir / "finetuned")
    assert any(f.endswith(".safetensors") for f in ft_files)
    # mergekit reads the per-expert checkpoint into transformers 5's stacked layout:
    # compare in that layout, as transformers loads it

    ft = AutoModelForCausalLM.from_pretrained(moe_dir / "finetuned", dtype=torch.bfloat16).state_dict()
    for layer in range(2):
        router = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(merged[router], ft[router]), router
        for name in (f"model.layers.{layer}.mlp.experts.down_proj", f"model.layers.{layer}.self_attn.q_proj.weight"):
            assert merged[name].dtype == torch.bfloat16 and merged[name].shape == ft[name].shape
            assert not torch.equal(merged[name], ft[name]), name
    # the recipe's out_dtype (bfloat16) ends with its merge: an in-memory merge after it
    # in the same process returns float32 values, as a fresh process would
    un = torch.zeros(6, 5)
    sds = {"ft": {"w.weight": torch.rand(6, 5) / 3}, "al": {"w.weight": torch.rand(6, 5)}, "un": {"w.weight": un}}
    out = merge_state_dicts(sds, "lssf", base="ft", parameters={"role": {"al": "aligned", "un": "unaligned"}})
    assert out["w.weight"].dtype == torch.float32 and not torch.equal(out["w.weight"], out["w.weight"].bfloat16().float())


def test_moe_toy_report_ranks_each_expert_and_skips_routers(moe_dir, tmp_path, monkeypatch):
    """``report`` on the MoE toy: one row per expert of each stacked weight, with the rank
    the merge's kernel gives that expert's 2-D matrices; no router row."""
    monkeypatch.chdir(moe_dir)
    monkeypatch.setenv("MERGEKIT_LSSF_ROLE_CHECK", "0")
    recipe = write_lssf_recipe(str(moe_dir), "report.yml", {})
    rows = build_report(plan_recipe(load_recipe(recipe)), str(tmp_path / "report"))["tensors"]
    names = [r["name"] for r in rows]
    assert not any(n.endswith("mlp.gate.weight") for n in names), "a router was reported"
    load = lambda m: AutoModelForCausalLM.from_pretrained(moe_dir / m, dtype=torch.float32).state_dict()  # noqa: E731
    al, un = load("aligned"), load("unaligned")
    stacked = "model.layers.1.mlp.experts.down_proj"
    expert_rows = [r for r in rows if r["name"].startswith(stacked)]
    assert len(expert_rows) == al[stacked].shape[0], names
    for e, row in enumerate(expert_rows):
        want = safety_factors(al[stacked][e], un[stacked][e], FusionSettings(eta=0.9, max_rank=256, fusion="restore"), factors=False)
        assert row["rank"] == want.info.rank, (row, e)
