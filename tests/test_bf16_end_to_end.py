"""bfloat16 checkpoints, as users have them, through plain mergekit-yaml, report and
extract-patch, against a float64 reference of the same rounded inputs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import load_state, run_cli, write_lssf_recipe
from reference import reference_fuse, reference_noise_floor

from mergekit_lssf.toy_models import ToySpec, build_toy_models

#: A small term: the safety delta is about half an ulp of the weights per entry, so
#: round-to-nearest into bfloat16 drops part of it (see test_precision.py).
SPEC = ToySpec(size="tiny", dtype="bfloat16", safety_scale=0.002, noise_scale=0.0001,
               drift_scale=0.0005, erosion=0.7, seed=3)
PARAMS = {"rank_rule": "noise_floor"}


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    build_toy_models(str(root), SPEC)
    return root


def _fused_names(state):
    return [n for n, t in state.items() if t.ndim == 2 and "embed" not in n and "lm_head" not in n]


def _reference(models):
    """Per fused weight: the float64 restore target and rank, from the stored bf16 values."""
    ft, al, un = (load_state(models / r) for r in ("finetuned", "aligned", "unaligned"))
    out = {}
    for name in _fused_names(ft):
        target, r = reference_fuse(*(x[name].double().numpy() for x in (ft, al, un)), alpha=1.0,
                                   rank_rule="noise_floor", fusion="restore")
        out[name] = (target, r, ft[name].double().numpy())
    return out


def _share(written, target, ft):
    term = target - ft
    return float(((written - ft) * term).sum() / (term * term).sum())


def test_bf16_triplet_merges_in_float32_and_writes_bf16_that_keeps_the_term(bf16_models, tmp_path):
    stored = load_file(bf16_models / "aligned" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    recipe = write_lssf_recipe(bf16_models, "bf16.yml", {**PARAMS, "round_to": "bfloat16"}, out_dtype="bfloat16")
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "merged"), "-v"], cwd=bf16_models)
    assert "narrower than float32" not in result.stderr  # the recommended recipe: no dtype warning
    assert "weights from 16-bit inputs; signal rank" in result.stderr
    assert "rounding edge" in result.stderr and "subspace-preserving rounding" in result.stderr  # -v, per tensor
    assert "the written weights keep min" in result.stderr
    merged = load_state(tmp_path / "merged")
    reference = _reference(bf16_models)
    shares = []
    for name, (target, r, ft) in reference.items():
        got = merged[name]
        assert got.dtype == torch.bfloat16, name
        written = got.double().numpy()
        spacing = np.abs(target).max() * 2.0 ** -8
        assert np.abs(written - target).max() <= 1.5 * spacing, name
        if r:
            shares.append(_share(written, target, ft))
    assert shares and min(shares) > 0.93
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "16-bit precision:" in card and "written as bfloat16" in card


def test_round_to_nearest_loses_the_term_and_says_which_tensors(bf16_models, tmp_path):
    recipe = write_lssf_recipe(bf16_models, "nearest.yml", {**PARAMS, "round_to": "bfloat16", "rounding": "nearest"},
                               out_dtype="bfloat16")
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "merged")], cwd=bf16_models)
    merged = load_state(tmp_path / "merged")
    shares = {name: _share(merged[name].double().numpy(), target, ft)
              for name, (target, r, ft) in _reference(bf16_models).items() if r}
    low = [n for n, s in shares.items() if s < 0.8]
    assert low, shares  # the toy is built so that the plain cast drops part of the term
    assert "keep less than 0.8 of their term after the output cast" in result.stderr
    assert low[0] in result.stderr.split("keep less than", 1)[1]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "keep less than 0.8" in card


def test_narrow_recipe_dtype_is_warned_with_the_line_to_write(bf16_models, tmp_path):
    recipe = write_lssf_recipe(bf16_models, "narrow.yml", PARAMS, dtype="bfloat16")
    result = run_cli(["mergekit-lssf", "check", recipe], cwd=bf16_models)
    assert "`dtype: bfloat16` is narrower than float32" in result.stdout
    assert "`dtype: float32` with `out_dtype: bfloat16`" in result.stdout


def test_report_gives_the_rounding_edge_and_signal_rank(bf16_models, tmp_path):
    recipe = write_lssf_recipe(bf16_models, "report.yml", {"max_rank": 256})
    result = run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "report")], cwd=bf16_models)
    assert "tensors from 16-bit inputs: signal rank" in result.stdout
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["tensors"]
    al, un = (load_state(bf16_models / r) for r in ("aligned", "unaligned"))
    for row in rows:
        s = np.linalg.svd(al[row["name"]].double().numpy() - un[row["name"]].double().numpy(), compute_uv=False)
        assert row["rounding_edge"] > 0
        assert row["signal_rank"] == int((s > row["rounding_edge"]).sum())
        # the toy plants 4 + 2 (layer % 3) directions; the noise-floor reference agrees
        assert row["signal_rank"] <= 4 + 2 * (row["layer"] % 3)
        assert abs(row["signal_rank"] - reference_noise_floor(s, tuple(al[row["name"]].shape))[0]) <= 2


def test_patch_from_bf16_models_keeps_float32_factors_and_the_whole_term(bf16_models, tmp_path):
    recipe = write_lssf_recipe(bf16_models, "patch.yml", PARAMS)
    patch = tmp_path / "patch"
    run_cli(["mergekit-lssf", "extract-patch", recipe, "--out", str(patch)], cwd=bf16_models)
    adapter = load_file(patch / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    config = json.loads((patch / "adapter_config.json").read_text())
    for name, (target, r, ft) in _reference(bf16_models).items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if not r:
            assert f"{key}.lora_A.weight" not in adapter
            continue
        a, b = adapter[f"{key}.lora_A.weight"].double(), adapter[f"{key}.lora_B.weight"].double()
        pattern = name.removesuffix(".weight").replace(".", "\\.")
        scale = config["alpha_pattern"][pattern] / config["rank_pattern"][pattern]
        term = (scale * b @ a).numpy()
        np.testing.assert_allclose(term, target - ft, atol=1e-6 * np.abs(target).max())
        assert _share(ft + term, target, ft) == pytest.approx(1.0, abs=1e-5)


def test_bf16_rounding_benchmark_tiny(tmp_path):
    """benchmarks/bf16_rounding.py end to end on generated models (its --tiny smoke test)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bf16_rounding.py")
    subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    results = json.loads((tmp_path / "bf16_rounding.json").read_text())["results"]
    rows = [r for r in results["noise_floor + restore"] if "kept_nearest" in r]
    assert any(not r["plain_cast"] for r in rows)  # the toy's small terms need the feedback
    assert rows and all(r["signal_rank"] is not None and r["rounding_edge"] > 0 for r in rows)
    assert min(r["kept_subspace"] for r in rows) > min(r["kept_nearest"] for r in rows)
    assert "| noise_floor + restore |" in (tmp_path / "bf16_rounding.md").read_text()
