"""Beyond the paper: ``rank_rule: noise_floor`` and ``fusion: restore``, against the
independent float64 references in reference.py (numpy SVD)."""

import numpy as np
import pytest
import torch

from reference import make_delta, reference_fuse, reference_noise_floor

from mergekit_lssf.kernel import gavish_donoho_omega, lssf_fuse, noise_floor, select_rank
from mergekit_lssf.parameters import FusionSettings


def _planted_plus_noise(rows, cols, planted_rank, seed, strength=8.0):
    """Planted singular values well above a Gaussian noise bulk (edge ~ sqrt(rows)+sqrt(cols))."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((rows, cols)) / np.sqrt(max(rows, cols))
    edge = 1 + np.sqrt(min(rows, cols) / max(rows, cols))
    planted = make_delta(rows, cols, strength * edge * np.linspace(2.0, 1.0, planted_rank), seed=seed + 1)
    return planted + noise


def _lora_like(rows, cols, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 8)) @ rng.standard_normal((8, cols)) * 0.01


CASES = {
    "planted_square": lambda: _planted_plus_noise(96, 96, 6, 0),
    "planted_tall": lambda: _planted_plus_noise(160, 64, 5, 1),
    "planted_wide": lambda: _planted_plus_noise(48, 200, 4, 2),
    "lora_rank8_tall": lambda: _lora_like(120, 40, 3),
    "lora_rank8_wide": lambda: _lora_like(40, 120, 4),
    "small_tall": lambda: _planted_plus_noise(30, 12, 2, 5),
    "zero": lambda: np.zeros((24, 40)),
}
PLANTED = {"planted_square": 6, "planted_tall": 5, "planted_wide": 4, "lora_rank8_tall": 8, "lora_rank8_wide": 8, "small_tall": 2}


def test_omega_matches_the_published_values():
    # Gavish & Donoho (2014): omega(1) ~ 2.858 for a square matrix, omega -> 1.43 as beta -> 0
    assert gavish_donoho_omega(1.0) == pytest.approx(2.86, abs=0.01)
    assert gavish_donoho_omega(1e-9) == pytest.approx(1.43, abs=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_noise_floor_rank_equals_reference_and_recovers_planted_rank(case):
    delta = CASES[case]()
    s = np.linalg.svd(delta, compute_uv=False)
    want, tau = reference_noise_floor(s, delta.shape)
    # through the kernel's own spectrum (Gram + eigensolver), as a merge computes it
    aligned = torch.from_numpy(delta)
    _, info = lssf_fuse(torch.zeros_like(aligned), aligned, torch.zeros_like(aligned), FusionSettings(fusion="add", alpha=1.0, eta=0.9, max_rank=None, rank_rule="noise_floor"))
    assert info.choice.rank == info.choice.noise_floor_rank == want, case
    assert info.choice.rule == "noise_floor"
    if want:
        assert info.choice.tau == pytest.approx(tau, rel=1e-6)
    if case in PLANTED:
        assert want == PLANTED[case], f"{case}: planted {PLANTED[case]}, threshold kept {want}"
    else:
        assert want == 0


def test_noise_floor_median_and_padding_match_numpy():
    rng = np.random.default_rng(7)
    for n, shape in ((9, (9, 30)), (10, (40, 10)), (6, (6, 6))):
        s = np.sort(rng.random(n))[::-1]
        got, tau = noise_floor(torch.from_numpy(s.copy()), shape)
        want, want_tau = reference_noise_floor(s, shape)
        assert (got, tau) == (want, pytest.approx(want_tau, rel=1e-12))
    # a calibration file lists only the nonzero values: the missing ones are zeros
    s = np.array([5.0, 4.0, 3.0])
    assert noise_floor(torch.from_numpy(s), (8, 100)) == (3, 0.0)


def test_noise_floor_is_capped_and_ignores_eta():
    delta = CASES["planted_square"]()
    s = torch.from_numpy(np.linalg.svd(delta, compute_uv=False))
    a = select_rank(s, eta=0.1, rule="noise_floor", shape=delta.shape)
    b = select_rank(s, eta=0.99, rule="noise_floor", shape=delta.shape)
    assert a.rank == b.rank == 6
    capped = select_rank(s, eta=0.9, rule="noise_floor", shape=delta.shape, max_rank=4)
    assert (capped.rank, capped.capped, capped.noise_floor_rank) == (4, True, 6)
    fixed = select_rank(s, eta=0.9, rule="noise_floor", shape=delta.shape, rank=3)
    assert (fixed.rank, fixed.rule) == (3, "fixed")


def test_rank_zero_leaves_the_weight_bit_identical():
    # all singular values equal: the median is sigma_1 and tau = omega * sigma_1 > sigma_1
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 32)))
    aligned = torch.from_numpy(q).float()
    ft = torch.randn(64, 32)
    out, info = lssf_fuse(ft, aligned, torch.zeros_like(aligned), FusionSettings(fusion="add", alpha=1.0, eta=0.9, rank_rule="noise_floor"))
    assert info.rank == 0 and out is ft
    out, info = lssf_fuse(ft, aligned, torch.zeros_like(aligned), FusionSettings(alpha=1.0, eta=0.9, rank_rule="noise_floor", fusion="restore"))
    assert info.rank == 0 and torch.equal(out, ft)


def _triple(rows, cols, seed):
    rng = np.random.default_rng(seed)
    unaligned = rng.standard_normal((rows, cols))
    aligned = unaligned + _planted_plus_noise(rows, cols, 5, seed) * 0.05
    ft = aligned + 0.02 * rng.standard_normal((rows, cols))
    return ft, aligned, unaligned


@pytest.mark.parametrize("shape", [(80, 48), (48, 80), (64, 64), (200, 40), (24, 20)])
@pytest.mark.parametrize("rule", ["entropy", "noise_floor"])
@pytest.mark.parametrize("fusion", ["add", "restore"])
@pytest.mark.parametrize("weight_max", [1.0, 1.7])
def test_fusions_and_rules_equal_the_reference(shape, rule, fusion, weight_max):
    ft, al, un = _triple(*shape, seed=sum(shape))
    params = dict(alpha=0.8, eta=0.85, max_rank=None, weight_max=weight_max, rank_rule=rule, fusion=fusion)
    want, r = reference_fuse(ft, al, un, **params)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        t = lambda x: torch.from_numpy(x).to(dtype)  # noqa: E731
        got, info = lssf_fuse(t(ft), t(al), t(un), FusionSettings(**params))
        assert info.rank == r
        assert got.dtype == dtype
        err = np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want - ft)
        assert err < tol * 10, (dtype, err)


@pytest.mark.parametrize("shape", [(90, 30), (30, 90)])  # input-side and output-side fast paths
def test_restore_at_alpha_one_gives_the_aligned_weights_inside_the_subspace(shape):
    ft, al, un = _triple(*shape, seed=3)
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    out, info = lssf_fuse(t(ft), t(al), t(un), FusionSettings(alpha=1.0, eta=0.9, fusion="restore"))
    u = np.linalg.svd(al - un, full_matrices=False)[0][:, : info.rank]
    np.testing.assert_allclose(u.T @ out.numpy(), u.T @ al, atol=1e-10)
    # and outside it, the fine-tune is untouched
    outside = np.eye(shape[0]) - u @ u.T
    np.testing.assert_allclose(outside @ out.numpy(), outside @ ft, atol=1e-10)


def test_restore_never_adds_more_than_the_aligned_model_had():
    # a fine-tune that kept all of delta: restore changes nothing, add adds delta again
    ft, al, un = _triple(40, 60, seed=9)
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    out, info = lssf_fuse(t(al), t(al), t(un), FusionSettings(alpha=1.0, eta=0.9, fusion="restore"))
    assert info.rank > 0
    np.testing.assert_allclose(out.numpy(), al, atol=1e-12)


def test_unknown_rule_or_fusion_is_named():
    s = torch.tensor([2.0, 1.0])
    with pytest.raises(ValueError, match="rank_rule must be one of entropy, noise_floor"):
        select_rank(s, eta=0.9, rule="gd")
    with pytest.raises(ValueError, match="`fusion` must be one of add, restore, contrastive, got 'pull'"):
        lssf_fuse(torch.zeros(2, 2), torch.eye(2), torch.zeros(2, 2), FusionSettings(alpha=1.0, eta=0.9, fusion="pull"))


# ---- end to end: mergekit-yaml, report, extract-patch, recipe validation ----------

MIXED = {
    "alpha": 0.9,
    "eta": 0.8,
    "rank_rule": [{"filter": "self_attn", "value": "noise_floor"}, {"value": "entropy"}],
    "fusion": [{"filter": "mlp", "value": "restore"}, {"value": "add"}],
}


def _expected(name):
    return dict(alpha=0.9, eta=0.8, max_rank=256,
                rank_rule="noise_floor" if "self_attn" in name else "entropy",
                fusion="restore" if "mlp" in name else "add")


def _is_fused(name, tensor):
    return tensor.ndim == 2 and "embed" not in name and "lm_head" not in name


@pytest.mark.slow
def test_mergekit_yaml_with_each_rule_and_fusion_matches_reference(toy_dir, tmp_path):
    from helpers import load_state, run_cli, write_lssf_recipe

    recipe = write_lssf_recipe(toy_dir, "rules.yml", MIXED)
    out = tmp_path / "merged"
    result = run_cli(["mergekit-yaml", recipe, str(out), "-v"], cwd=toy_dir)
    assert "eta 0.8 not used by this rule" in result.stderr  # the noise-floor tensors say so
    assert "fusion restore" in result.stderr and "fusion add" in result.stderr
    merged, ft = load_state(out), load_state(toy_dir / "finetuned")
    al, un = load_state(toy_dir / "aligned"), load_state(toy_dir / "unaligned")
    seen = set()
    for name, tensor in merged.items():
        if not _is_fused(name, tensor):
            assert torch.equal(tensor, ft[name]), name
            continue
        params = _expected(name)
        want, r = reference_fuse(ft[name].numpy(), al[name].numpy(), un[name].numpy(), **params)
        if r == 0:
            assert torch.equal(tensor, ft[name]), name
        else:
            rel = np.linalg.norm(tensor.double().numpy() - want) / np.linalg.norm(want - ft[name].double().numpy())
            assert rel < 1e-4, (name, rel)
        seen.add((params["rank_rule"], params["fusion"]))
    assert seen == {("noise_floor", "add"), ("entropy", "restore")}  # attention, MLP


@pytest.mark.slow
def test_report_lists_both_ranks_and_the_rule_used(toy_dir, tmp_path):
    import json

    from helpers import load_state, run_cli, write_lssf_recipe

    recipe = write_lssf_recipe(toy_dir, "rules-report.yml", MIXED)
    run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "rep")], cwd=toy_dir)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    al, un = load_state(toy_dir / "aligned"), load_state(toy_dir / "unaligned")
    for row in report["tensors"]:
        delta = (al[row["name"]] - un[row["name"]]).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        floor, _ = reference_noise_floor(s, delta.shape)
        params = _expected(row["name"])
        assert row["noise_floor_rank"] == floor, row["name"]
        assert (row["rank_rule"], row["fusion"]) == (params["rank_rule"], params["fusion"])
        assert row["rank"] == reference_fuse(delta, delta, 0 * delta, **params)[1]
    assert report["summary"]["rank_rules"] == ["entropy", "noise_floor"]
    assert report["summary"]["fusions"] == ["add", "restore"]
    header = (tmp_path / "rep" / "report.csv").read_text().splitlines()[0].split(",")
    assert {"rank_rule", "fusion", "entropy_rank", "noise_floor_rank"} <= set(header)


@pytest.mark.slow
def test_restore_patch_reproduces_the_merge_of_its_own_finetune(toy_dir, tmp_path):
    import json

    from safetensors import safe_open

    from helpers import load_state, run_cli, write_lssf_recipe

    recipe = write_lssf_recipe(toy_dir, "restore.yml", {"fusion": "restore", "alpha": 0.8})
    patch = tmp_path / "patch"
    run_cli(["mergekit-lssf", "extract-patch", recipe, "--out", str(patch)], cwd=toy_dir)
    config = json.loads((patch / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "./finetuned"  # for this fine-tune only
    readme = (patch / "README.md").read_text()
    assert "apply it to **./finetuned only**" in readme and "restore" in readme
    with safe_open(patch / "adapter_model.safetensors", framework="pt") as fp:
        meta = fp.metadata()
    assert meta["lssf_applies_to"] == "only ./finetuned"
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "merged")], cwd=toy_dir)
    expected = load_state(tmp_path / "merged")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_dir / "finetuned", dtype=torch.float32), patch)
    state = model.merge_and_unload().state_dict()
    for name, tensor in expected.items():
        assert (state[name] - tensor).norm() / tensor.norm().clamp(min=1e-12) < 1e-4, name


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank_rule": "gavish"}, "parameters.rank_rule: lssf parameter `rank_rule` must be one of entropy, noise_floor, got 'gavish'"),
        ({"fusion": "pull"}, "parameters.fusion: lssf parameter `fusion` must be one of add, restore, contrastive, got 'pull'"),
        ({"fusion": [{"filter": "mlp", "value": "Restore"}, {"value": "add"}]}, "must be one of add, restore, contrastive, got 'Restore'"),
    ],
)
def test_recipe_check_names_bad_values(toy_dir, params, message):
    import yaml
    from mergekit.config import MergeConfiguration

    from helpers import write_lssf_recipe
    from mergekit_lssf import LSSFConfigError
    from mergekit_lssf.recipe import check_recipe

    name = write_lssf_recipe(toy_dir, "bad-rule.yml", params)
    config = MergeConfiguration.model_validate(yaml.safe_load((toy_dir / name).read_text()))
    import os

    previous = os.getcwd()
    os.chdir(toy_dir)
    try:
        with pytest.raises(LSSFConfigError) as caught:
            check_recipe(config)
    finally:
        os.chdir(previous)
    assert message in str(caught.value)


def test_in_memory_api_knows_the_options():
    import mergekit_lssf  # noqa: F401
    from mergekit.merge_methods import merge_state_dicts

    ft, al, un = _triple(40, 30, seed=1)
    t = lambda x: {"model.layers.0.mlp.up_proj.weight": torch.from_numpy(x).float()}  # noqa: E731
    merged = merge_state_dicts(
        {"ft": t(ft), "al": t(al), "un": t(un)}, "lssf", base="ft",
        parameters={"role": {"al": "aligned", "un": "unaligned"}, "alpha": 1.0,
                    "rank_rule": "noise_floor", "fusion": "restore"},
    )
    want, _ = reference_fuse(ft, al, un, alpha=1.0, max_rank=256, rank_rule="noise_floor", fusion="restore")
    got = merged["model.layers.0.mlp.up_proj.weight"].double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want - ft) < 1e-4


def test_setting_names_are_defined_once():
    """The kernel's checks and the recipe validators read the same tuples, derived from
    the kernel's Literal argument types (mergekit_lssf.vocabulary)."""
    from typing import get_args

    from mergekit_lssf import kernel, parameters, vocabulary

    for name, literal in (("RANK_RULES", "RankRule"), ("FUSIONS", "Fusion"), ("SPECTRA", "Spectrum"), ("ROUNDINGS", "Rounding")):
        assert getattr(kernel, name) is getattr(parameters, name) is getattr(vocabulary, name), name
        assert getattr(vocabulary, name) == get_args(getattr(vocabulary, literal))
    assert parameters.DEFAULT_FUSION in vocabulary.FUSIONS and parameters.DEFAULT_RANK_RULE in vocabulary.RANK_RULES
