"""``mergekit-lssf calibrate RECIPE --task``: the contrastive calibration, against input
Grams this test takes itself (each row alone through transformers' own model, with
forward pre-hooks), and the closed form built from them in float64 (issue 46)."""

import json
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import linear_inputs, load_state, run_cli, word_rows, write_lssf_recipe
from test_contrastive import _numpy_entropy_k  # the one independent Eq. 5-7 of both test files
from mergekit_lssf.contrastive import contrastive_fuse
from mergekit_lssf.contrastive_file import FORMAT, open_contrastive
from mergekit_lssf.subspace_file import model_fingerprint
from mergekit_lssf.toy_models import ToySpec, build_toy_models

def _jsonl(path, rows, answer_key):
    with open(path, "w", encoding="utf-8") as fp:
        for prompt, answer in rows:
            fp.write(json.dumps({"prompt": prompt, answer_key: answer}) + "\n")
    return str(path)


def _grams(model_dir, rows):
    """Raw float64 input Grams of every linear weight of the decoder blocks
    (``helpers.linear_inputs``: each row rendered as training renders it, run alone),
    trace-normalised."""
    grams = {k: x.T @ x for k, x in linear_inputs(model_dir, rows).items()}
    return {k: g / np.trace(g) for k, g in grams.items()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    build_toy_models(str(root), ToySpec(size="tiny", seed=5))
    write_lssf_recipe(root, "recipe.yml", {})
    return root


@pytest.fixture(scope="module")
def calibrated(toy):
    anchors, task = word_rows(1, 48), word_rows(2, 48)
    _jsonl(toy / "anchors.jsonl", anchors, "response")
    _jsonl(toy / "task.jsonl", task, "answer")
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--anchors", "anchors.jsonl",
                      "--out", "ft.contrastive.safetensors", "--max-rank", "full", "--batch-size", "5"], cwd=toy)
    return toy / "ft.contrastive.safetensors", anchors, task, result


def test_the_file_says_what_it_holds(toy, calibrated):
    path, anchors, task, result = calibrated
    assert "48 anchors" in result.stdout and "48 task rows" in result.stdout and "input sites" in result.stdout
    assert "peak memory" in result.stdout
    with safe_open(path, "pt") as h:
        meta = h.metadata()
    assert meta["format"] == FORMAT and meta["task"] == "task" and float(meta["eps"]) == 1e-6
    assert meta["finetuned_fingerprint"] == model_fingerprint(str(toy / "finetuned"))
    assert meta["aligned_fingerprint"] == model_fingerprint(str(toy / "aligned"))
    sites = json.loads(meta["sites"])
    layer0 = "model.layers.0."
    assert sites[layer0 + "self_attn.q_proj.weight"] == sites[layer0 + "self_attn.k_proj.weight"] \
        == sites[layer0 + "self_attn.v_proj.weight"]
    assert sites[layer0 + "mlp.gate_proj.weight"] == sites[layer0 + "mlp.up_proj.weight"]
    assert sites[layer0 + "mlp.down_proj.weight"] == layer0 + "mlp.down_proj.weight"
    with safe_open(path, "pt") as h:  # --max-rank full: every vector, every mu, nothing dropped
        for site in set(sites.values()):
            v, mu = h.get_tensor(f"{site}.V"), h.get_tensor(f"{site}.mu")
            assert v.dtype == mu.dtype == torch.float64 and v.shape == (mu.numel(), mu.numel())
    assert (meta["dropped_mu_share"], meta["dropped_mu_site"]) == ("0.0", "")
    assert "dropped" not in result.stderr  # said only when --max-rank left something out


def test_the_merge_at_lam_1_matches_the_closed_form_of_independent_grams(toy, calibrated):
    """Issue 46's check: ||(W' - W_ref)(C_H + C_T)^1/2|| <= 0.05 ||(W_ref - W_ft)(C_H + C_T)^1/2||,
    with W_ref = W_ft + (W_al - W_ft) C_H (C_H + B)^-1 from this test's own Grams."""
    path, anchors, task, _ = calibrated
    c_h, c_t = _grams(str(toy / "finetuned"), anchors), _grams(str(toy / "finetuned"), task)
    ft = dict(AutoModelForCausalLM.from_pretrained(toy / "finetuned", dtype=torch.float32).state_dict())
    al = dict(AutoModelForCausalLM.from_pretrained(toy / "aligned", dtype=torch.float32).state_dict())
    calibration = open_contrastive(str(path))
    assert set(c_h) == set(calibration.sites)
    for name in sorted(c_h):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        b = c_t[name] + 1e-6 * np.eye(len(c_t[name]))
        w_ref = w_ft + (w_al - w_ft) @ np.linalg.solve((c_h[name] + b).T, c_h[name].T).T
        basis = calibration.basis(name, w_ft.shape[1])
        w_new = contrastive_fuse(ft[name], al[name], basis, lam=1.0).numpy()
        root = scipy.linalg.sqrtm(c_h[name] + c_t[name]).real
        assert np.linalg.norm((w_new - w_ref) @ root) <= 1e-3 * np.linalg.norm((w_ref - w_ft) @ root), name  # issue 46 asks 0.05


@pytest.fixture(scope="module")
def same_rows(toy):
    """A calibration whose anchors and task rows are the same 48 rows."""
    rows = word_rows(3, 48)
    _jsonl(toy / "same-anchors.jsonl", rows, "response")
    _jsonl(toy / "same-task.jsonl", rows, "answer")
    run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "same-task.jsonl", "--anchors", "same-anchors.jsonl",
             "--out", "same.safetensors", "--max-rank", "full"], cwd=toy)
    return rows


def test_the_same_rows_as_anchors_and_task_give_an_even_split_on_their_span(toy, same_rows):
    """Identical rows give identical Grams (C_H = C_T = C), so at lam 1 the restore is
    linear interpolation at 0.5 on the rows' span: ||(R - I/2) C^1/2|| small."""
    c = _grams(str(toy / "finetuned"), same_rows)
    calibration = open_contrastive(str(toy / "same.safetensors"))
    for name in sorted(c):
        basis = calibration.basis(name, c[name].shape[0])
        weights = (basis.mu / (basis.mu + 1.0)).numpy()
        r = (basis.bv.numpy() * weights) @ basis.v.numpy().T
        root = scipy.linalg.sqrtm(c[name]).real
        assert np.linalg.norm((r - 0.5 * np.eye(len(r))) @ root) <= 0.02 * np.linalg.norm(0.5 * root), name


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n', 'bad-task.jsonl:2: the row has no "answer" string'),
    ('{"prompt": "a", "answer": "b"}\nnot json\n', "bad-task.jsonl:2: not a JSON object"),
    ("", "bad-task.jsonl: no task rows"),
])
def test_a_bad_task_file_is_one_line_and_writes_nothing(toy, content, message):
    (toy / "bad-task.jsonl").write_text(content)
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "bad-task.jsonl", "--out", "never.safetensors"],
                     cwd=toy, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not os.path.exists(toy / "never.safetensors")


def test_an_existing_out_file_is_never_replaced(toy, calibrated):
    path, *_ = calibrated
    before = path.read_bytes()
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--out", path.name],
                     cwd=toy, check=False)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert path.read_bytes() == before


# ---- fusion: contrastive through mergekit-yaml -------------------------------------------

def _contrastive_recipe(root, name, calibration, lam=1.0, base="./finetuned", **extra):
    doc = {"merge_method": "lssf", "base_model": base,
           "models": [{"model": "./aligned", "parameters": {"role": "aligned"}}],
           "parameters": {"fusion": "contrastive", "calibration": calibration, "lam": lam, **extra.pop("parameters", {})},
           "dtype": "float32", **extra}
    with open(root / name, "w", encoding="utf-8") as fp:
        yaml.safe_dump(doc, fp)
    return name


def test_mergekit_yaml_writes_the_closed_form(toy, calibrated, tmp_path):
    """The merge at lam 1 (aligned model only, no unaligned one) against the closed
    form from this test's own Grams: issue 46's 0.05 check on every fused weight."""
    path, anchors, task, _ = calibrated
    recipe = _contrastive_recipe(toy, "contrastive.yml", path.name)
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "out")], cwd=toy)
    assert "contrastive" in result.stderr
    merged = load_state(tmp_path / "out")
    c_h, c_t = _grams(str(toy / "finetuned"), anchors), _grams(str(toy / "finetuned"), task)
    ft, al = load_state(toy / "finetuned"), load_state(toy / "aligned")
    for name in sorted(c_h):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        b = c_t[name] + 1e-6 * np.eye(len(c_t[name]))
        w_ref = w_ft + (w_al - w_ft) @ np.linalg.solve((c_h[name] + b).T, c_h[name].T).T
        root = scipy.linalg.sqrtm(c_h[name] + c_t[name]).real
        got = merged[name].double().numpy()
        assert np.linalg.norm((got - w_ref) @ root) <= 1e-3 * np.linalg.norm((w_ref - w_ft) @ root), name  # issue 46 asks 0.05
    for name, tensor in merged.items():
        if name not in c_h:
            assert torch.equal(tensor, ft[name]), name  # every other tensor is the fine-tune's


def test_the_keep_control_merges_the_closed_form_with_c_h_the_identity(toy, calibrated, tmp_path):
    """``calibrate --keep-control``: the file says so, and mergekit-yaml at lam 3 writes
    ``W_ft + (W_al - W_ft) (I/d) (I/d + lam B)^-1`` (this test's own task Grams, float64)."""
    _, _, task, _ = calibrated
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--anchors", "anchors.jsonl",
                      "--out", "keep.contrastive.safetensors", "--max-rank", "full", "--keep-control"], cwd=toy)
    assert "the C_H = I control" in result.stdout
    with safe_open(toy / "keep.contrastive.safetensors", "pt") as h:
        assert h.metadata()["harmful_gram"] == "identity"
    run_cli(["mergekit-yaml", _contrastive_recipe(toy, "keep.yml", "keep.contrastive.safetensors", lam=3.0),
             str(tmp_path / "out")], cwd=toy)
    merged, ft, al = load_state(tmp_path / "out"), load_state(toy / "finetuned"), load_state(toy / "aligned")
    c_t = _grams(str(toy / "finetuned"), task)
    for name in sorted(c_t):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        d = len(c_t[name])
        c_h, b = np.eye(d) / d, c_t[name] + 1e-6 * np.eye(d)
        w_ref = w_ft + (w_al - w_ft) @ np.linalg.solve((c_h + 3.0 * b).T, c_h.T).T
        got = merged[name].double().numpy()
        assert np.linalg.norm(w_ref - w_ft) > 0, name
        assert np.linalg.norm(got - w_ref) <= 1e-3 * np.linalg.norm(w_ref - w_ft), name


def test_the_keep_control_needs_a_recipe_and_every_vector(toy, calibrated):
    result = run_cli(["mergekit-lssf", "calibrate", "aligned", "--out", "x.safetensors", "--keep-control"], cwd=toy,
                     check=False)
    assert result.returncode != 0 and "--keep-control" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--out", "x.safetensors",
                      "--keep-control", "--max-rank", "8"], cwd=toy, check=False)
    assert result.returncode != 0 and "--keep-control needs --max-rank full" in result.stderr
    assert "Traceback" not in result.stderr and not (toy / "x.safetensors").exists()


def test_same_rows_merge_like_linear_at_one_half_on_the_data(toy, same_rows, tmp_path):
    """Anchors = task rows, lam 1: the merge matches mergekit's `linear` at 0.5 / 0.5
    on the rows' activations (issue 46: within 0.02)."""
    rows = same_rows
    recipe = _contrastive_recipe(toy, "same.yml", "same.safetensors")
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "contrastive")], cwd=toy)
    with open(toy / "linear.yml", "w") as fp:
        yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": "./finetuned", "parameters": {"weight": 0.5}},
            {"model": "./aligned", "parameters": {"weight": 0.5}}]}, fp)
    run_cli(["mergekit-yaml", "linear.yml", str(tmp_path / "linear")], cwd=toy)
    got, lin, ft = load_state(tmp_path / "contrastive"), load_state(tmp_path / "linear"), load_state(toy / "finetuned")
    c = _grams(str(toy / "finetuned"), rows)
    for name in sorted(c):
        root = scipy.linalg.sqrtm(c[name]).real
        w, w_lin, w_ft = (x[name].double().numpy() for x in (got, lin, ft))
        assert np.linalg.norm((w - w_lin) @ root) <= 0.02 * np.linalg.norm((w_lin - w_ft) @ root), name


def test_every_entry_point_writes_the_same_contrastive_bits(toy, calibrated, tmp_path):
    from mergekit.merge_methods import merge_state_dicts

    path, *_ = calibrated
    recipe = _contrastive_recipe(toy, "bits.yml", path.name, lam=3.0, parameters={"rank": 4, "round_to": "bfloat16"},
                                 out_dtype="bfloat16")
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "yaml")], cwd=toy)
    states = {"ft": load_state(toy / "finetuned"), "al": load_state(toy / "aligned")}
    memory = merge_state_dicts(states, "lssf", base="ft", out_dtype=torch.bfloat16, parameters={
        "role": {"al": "aligned"}, "fusion": "contrastive", "calibration": str(path), "lam": 3.0, "rank": 4,
        "round_to": "bfloat16"})
    by_yaml = load_state(tmp_path / "yaml")
    assert all(torch.equal(by_yaml[n], t) for n, t in memory.items())


@pytest.mark.parametrize("parameters, message", [
    ({"fusion": "contrastive"}, "`fusion: contrastive` needs `calibration: FILE`"),
    ({"calibration": "ft.contrastive.safetensors"}, "`calibration` is read by `fusion: contrastive` only"),
    ({"fusion": "contrastive", "calibration": "ft.contrastive.safetensors", "lam": 0}, "`lam` must satisfy 0 < lam"),
    ({"subspace": "ft.contrastive.safetensors"}, "is not an lssf subspace file"),
    ({"fusion": "contrastive", "calibration": "ft.contrastive.safetensors", "eta": 0.5},
     "`eta: 0.5` is not read by `fusion: contrastive`"),
    ({"lam": 2}, "`lam` is read by `fusion: contrastive` only, not `fusion: restore`"),
    ({"fusion": "contrastive", "calibration": "ft.contrastive.safetensors", "rank_rule": "noise_floor"},
     "`rank_rule: noise_floor` is not read by `fusion: contrastive`"),
    ({"fusion": "contrastive", "calibration": "ft.contrastive.safetensors", "rank": 500},
     "parameters.rank: rank 500 is more than the"),
])
def test_contrastive_recipe_errors_are_one_line(toy, calibrated, tmp_path, parameters, message):
    recipe = write_lssf_recipe(toy, "bad-contrastive.yml", parameters)
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "never")], cwd=toy, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_a_calibration_of_another_fine_tune_is_refused(toy, calibrated, tmp_path):
    """Same base, same shapes, another fine-tune (here the unaligned model stands in):
    the fingerprints differ and nothing is written."""
    path, *_ = calibrated
    recipe = _contrastive_recipe(toy, "other.yml", path.name, base="./unaligned")
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "never")], cwd=toy, check=False)
    assert result.returncode == 1 and "was calibrated on" in result.stderr and "fine-tune (base_model)" in result.stderr
    assert not (tmp_path / "never").exists()


def test_extract_patch_of_a_contrastive_recipe_is_the_merge(toy, calibrated, tmp_path):
    """The adapter's B @ A added to the fine-tune gives the mergekit-yaml merge."""
    from safetensors.torch import load_file

    path, *_ = calibrated
    recipe = _contrastive_recipe(toy, "patch.yml", path.name, lam=3.0)
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "merged")], cwd=toy)
    run_cli(["mergekit-lssf", "extract-patch", recipe, "--out", str(tmp_path / "patch")], cwd=toy)
    adapter = load_file(tmp_path / "patch" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "patch" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "./finetuned"  # the term depends on the fine-tune
    merged, ft = load_state(tmp_path / "merged"), load_state(toy / "finetuned")
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    assert len(modules) == 14
    for module in modules:
        b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        want = merged[f"{module}.weight"].double()
        got = ft[f"{module}.weight"].double() + b @ a
        assert torch.linalg.matrix_norm(got - want) <= 1e-5 * torch.linalg.matrix_norm(want), module


def test_the_readme_commands_for_task_data_run_as_written(toy, tmp_path):
    """README "When you have task data": its recipe and its two commands, as written,
    on the toy models standing in for ./my-finetune and ./aligned-model."""
    import re
    import subprocess

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = text.split("## When you have task data", 1)[1].split("\n## ", 1)[0]
    recipe = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands = [c for c in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines() if c.strip()]
    assert len(commands) == 2 and "calibrate contrastive.yml --task task.jsonl" in commands[0]
    (tmp_path / "my-finetune").symlink_to(toy / "finetuned")
    (tmp_path / "aligned-model").symlink_to(toy / "aligned")
    (tmp_path / "contrastive.yml").write_text(recipe)
    _jsonl(tmp_path / "task.jsonl", word_rows(2, 8), "answer")
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert (tmp_path / "repaired-contrastive" / "model.safetensors").exists()


def _lora(aligned, out, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)


def test_a_model_plus_lora_fine_tune_is_calibrated_and_merged(toy, tmp_path):
    """The headline case: base_model ALIGNED+LORA, merged once in --lora-merge-cache by
    calibrate, reused by mergekit-yaml; a calibration of another adapter is refused."""
    _lora(toy / "aligned", toy / "lora-a", 1)
    _lora(toy / "aligned", toy / "lora-b", 2)
    _jsonl(toy / "lora-anchors.jsonl", word_rows(4, 12), "response")
    _jsonl(toy / "lora-task.jsonl", word_rows(5, 12), "answer")
    recipe = _contrastive_recipe(toy, "lora.yml", "lora-a.safetensors", base="./aligned+./lora-a")
    result = run_cli(["mergekit-lssf", "calibrate", recipe, "--task", "lora-task.jsonl", "--anchors", "lora-anchors.jsonl",
                      "--out", "lora-a.safetensors", "--lora-merge-cache", "cache"], cwd=toy)
    assert "12 task rows" in result.stdout
    with safe_open(toy / "lora-a.safetensors", "pt") as h:
        meta = h.metadata()
    assert meta["finetuned_base_fingerprint"] == model_fingerprint(str(toy / "aligned"))
    assert "finetuned_adapter_sha256" in meta and "finetuned_fingerprint" not in meta
    run_cli(["mergekit-yaml", recipe, str(tmp_path / "out"), "--lora-merge-cache", "cache"], cwd=toy)
    merged = load_state(tmp_path / "out")
    ft = load_state(next((toy / "cache").iterdir()))
    assert any(not torch.equal(merged[n], ft[n]) for n in merged if ".layers." in n)
    other = _contrastive_recipe(toy, "lora-b.yml", "lora-a.safetensors", base="./aligned+./lora-b")
    refused = run_cli(["mergekit-yaml", other, str(tmp_path / "never"), "--lora-merge-cache", "cache"], cwd=toy,
                      check=False)
    assert refused.returncode == 1 and "fine-tune's adapter" in refused.stderr and not (tmp_path / "never").exists()


# ---- the whole spectrum, rank_rule: entropy over mu, the term's norm, float32 files ------

def _file(path):
    """Every tensor of a calibration file (float64 numpy) and its metadata."""
    with safe_open(path, "pt") as h:
        return {k: h.get_tensor(k).double().numpy() for k in h.keys()}, h.metadata()


@pytest.fixture(scope="module")
def truncated(toy, calibrated):
    """The calibration of `calibrated` (same rows, same batches) with --max-rank 4."""
    result = run_cli(["mergekit-lssf", "calibrate", "recipe.yml", "--task", "task.jsonl", "--anchors", "anchors.jsonl",
                      "--out", "ft.k4.safetensors", "--max-rank", "4", "--batch-size", "5"], cwd=toy)
    return toy / "ft.k4.safetensors", result


def test_a_truncated_file_keeps_every_mu_and_says_what_the_dropped_vectors_carry(toy, calibrated, truncated):
    path, result = truncated
    tensors, meta = _file(path)
    full, _ = _file(calibrated[0])
    sites = set(json.loads(meta["sites"]).values())
    shares = {}
    for site in sites:
        v, bv, mu = tensors[f"{site}.V"], tensors[f"{site}.BV"], tensors[f"{site}.mu"]
        assert v.shape == bv.shape == (mu.size, 4)  # V and BV: the leading 4; mu: all of them
        np.testing.assert_allclose(mu, full[f"{site}.mu"], rtol=1e-9, atol=1e-15)
        shares[site] = mu[4:].sum() / mu.sum()
    top = max(shares, key=shares.get)
    assert float(meta["dropped_mu_share"]) == pytest.approx(shares[top], rel=1e-9) and meta["dropped_mu_site"] == top
    assert shares[top] > 0
    summary = result.stdout.strip().splitlines()[-1]  # the summary line names what --max-rank left out
    assert summary.startswith("Wrote ") and f"the dropped vectors carry at most {100 * shares[top]:.3g}% of sum(mu) (site {top})" in summary
    assert open_contrastive(str(path)).stored_rank() == 4  # vectors stored, not the length of mu


def _entropy_merge(name, tensors, sites, w_ft, w_al, lam, eta, stored=None):
    """The merge of one weight with k by Eq. 5-7 on the site's whole mu (numpy),
    capped at the stored vectors, from the file's V and BV: (W', k wanted, k used)."""
    site = sites[name]
    v, bv, mu = tensors[f"{site}.V"], tensors[f"{site}.BV"], tensors[f"{site}.mu"]
    wanted = _numpy_entropy_k(mu, eta)
    k = min(wanted, v.shape[1] if stored is None else stored)
    term = (w_al - w_ft) @ (bv[:, :k] * (mu[:k] / (mu[:k] + lam))) @ v[:, :k].T
    return w_ft + term, wanted, k


def _summary_number(text, label):
    import re

    return float(re.search(rf"{label} ([0-9.e+-]+)", text).group(1))


def test_rank_rule_entropy_through_mergekit_yaml_is_eq_5_to_7_on_mu(toy, calibrated, tmp_path):
    """`rank_rule: entropy` picks k per weight by Eq. 5-7 on its site's mu (checked
    against numpy), the merge is the k-term formula, and the summary and the model card
    show k and ||term|| / ||W_al - W_ft|| (min / median / max)."""
    path, *_ = calibrated
    recipe = _contrastive_recipe(toy, "entropy.yml", path.name, lam=1.0,
                                 parameters={"rank_rule": "entropy", "eta": 0.9})
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "out")], cwd=toy)
    merged, ft, al = load_state(tmp_path / "out"), load_state(toy / "finetuned"), load_state(toy / "aligned")
    tensors, meta = _file(path)
    sites = json.loads(meta["sites"])
    ks, ratios = [], []
    for name in sorted(sites):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        want, wanted, k = _entropy_merge(name, tensors, sites, w_ft, w_al, lam=1.0, eta=0.9)
        assert k == wanted < w_ft.shape[1], name  # the rule, not every stored vector
        got = merged[name].double().numpy()
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want - w_ft), name
        ks.append(k)
        ratios.append(np.linalg.norm(want - w_ft) / np.linalg.norm(w_al - w_ft))
    line = next(x for x in result.stderr.splitlines() if x.startswith("lssf: contrastive:"))
    assert f"{len(ks)} weights; k min {min(ks)} / median {float(np.median(ks)):g} / max {max(ks)}" in line
    for label, value in (("min", min(ratios)), ("median", float(np.median(ratios))), ("max", max(ratios))):
        assert _summary_number(line.split("||W_aligned - W_ft||", 1)[1], label) == pytest.approx(value, rel=5e-3)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- contrastive term: " + line.removeprefix("lssf: contrastive: ") in card
    assert "k by the entropy rule over mu (eta 0.9)" in card  # the applied formula
    assert "wants more vectors" not in result.stderr  # a full file holds every vector the rule wants


def test_the_entropy_rule_is_capped_at_the_stored_vectors_with_one_warning(toy, truncated, tmp_path):
    path, _ = truncated
    recipe = _contrastive_recipe(toy, "entropy-k4.yml", path.name, lam=1.0,
                                 parameters={"rank_rule": "entropy", "eta": 0.9})
    result = run_cli(["mergekit-yaml", recipe, str(tmp_path / "out")], cwd=toy)
    merged, ft, al = load_state(tmp_path / "out"), load_state(toy / "finetuned"), load_state(toy / "aligned")
    tensors, meta = _file(path)
    sites = json.loads(meta["sites"])
    short = {}
    for name in sorted(sites):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        want, wanted, k = _entropy_merge(name, tensors, sites, w_ft, w_al, lam=1.0, eta=0.9)
        assert k == min(wanted, 4)
        assert np.linalg.norm(merged[name].double().numpy() - want) <= 1e-5 * np.linalg.norm(want - w_ft), name
        if wanted > 4:
            short[sites[name]] = wanted
    assert short  # the rule wants more than 4 somewhere: the cap is exercised
    lines = [x for x in result.stderr.splitlines() if "wants more vectors than the calibration stores" in x]
    assert len(lines) == 1 and f"at {len(short)} input sites" in lines[0]
    first = min(short)
    assert f"{first} wants {short[first]}, stores 4" in lines[0]


def test_report_of_a_contrastive_recipe_prints_k_and_the_term_ratio_per_weight(toy, calibrated, tmp_path):
    path, *_ = calibrated
    recipe = _contrastive_recipe(toy, "report.yml", path.name, lam=3.0, parameters={"rank_rule": "entropy", "alpha": 0.8})
    result = run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "rep")], cwd=toy)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    ft, al = load_state(toy / "finetuned"), load_state(toy / "aligned")
    tensors, meta = _file(path)
    sites = json.loads(meta["sites"])
    rows = {r["name"]: r for r in report["tensors"]}
    assert set(rows) == set(sites) and report["summary"]["contrastive"] == len(sites)
    for name, row in rows.items():
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        want, wanted, k = _entropy_merge(name, tensors, sites, w_ft, w_al, lam=3.0, eta=0.9)
        ratio = 0.8 * np.linalg.norm(want - w_ft) / np.linalg.norm(w_al - w_ft)
        assert (row["rank"], row["entropy_rank"], row["rank_rule"], row["fusion"]) == (k, wanted, "entropy", "contrastive")
        assert row["term_ratio"] == pytest.approx(ratio, rel=1e-9), name
        assert row["gap_norm"] == pytest.approx(np.linalg.norm(w_al - w_ft), rel=1e-12)
        assert f"{name}: k {k}, ||term|| / ||W_aligned - W_ft|| {row['term_ratio']:.3g}" in result.stdout
    assert report["summary"]["term_ratio_max"] == max(r["term_ratio"] for r in rows.values())
    header = (tmp_path / "rep" / "report.csv").read_text().splitlines()[0].split(",")
    assert {"term_norm", "gap_norm", "term_ratio", "lam"} <= set(header)


def test_a_float32_copy_of_the_file_is_measurably_less_exact(toy, tmp_path, monkeypatch):
    """Issue 46: at full k the merge equals W_ft + (W_al - W_ft) C_H (C_H + lam B)^-1,
    here from the very Grams the calibration solved (recorded in-process), within 1e-6
    relative from the float64 file; a copy with V, BV and mu cast to float32 is
    measured against the same closed form (V's entries grow like eps^-1/2)."""
    from safetensors.torch import save_file

    import mergekit_lssf.contrastive_calibrate as cc
    from mergekit_lssf.contrastive import contrastive_basis
    from mergekit_lssf.kernel import write_fused
    from mergekit_lssf.merge_method import term_factors
    from mergekit_lssf.parameters import settings_from

    solved = []

    def recording(c_h, c_t, **kwargs):
        basis = contrastive_basis(c_h, c_t, **kwargs)
        solved.append((c_h.numpy(), c_t.numpy(), basis.spectrum.numpy()))
        return basis

    monkeypatch.setattr(cc, "contrastive_basis", recording)
    _jsonl(tmp_path / "a.jsonl", word_rows(6, 24), "response")
    eps, lam = 1e-6, 1.0
    out64 = tmp_path / "f64.safetensors"
    cc.contrastive_calibrate(cc.Roles(str(toy / "finetuned"), str(toy / "aligned")), str(out64),
                             task=[cc.Anchor(p, a) for p, a in word_rows(7, 24)], anchors_path=str(tmp_path / "a.jsonl"),
                             max_rank=None, eps=eps, device="cpu", batch_size=4, progress=False, log=lambda _line: None)
    tensors, meta = _file(out64)
    with safe_open(out64, "pt") as h:
        save_file({k: h.get_tensor(k).to(torch.float32) for k in h.keys()}, str(tmp_path / "f32.safetensors"),
                  metadata=meta)
    sites = json.loads(meta["sites"])
    grams = {}
    for site in set(sites.values()):
        c_h, c_t, _ = next(x for x in solved if np.array_equal(x[2], tensors[f"{site}.mu"]))
        grams[site] = (c_h, c_t)
    ft, al = load_state(toy / "finetuned"), load_state(toy / "aligned")
    errors = {}
    for label in ("f64", "f32"):
        settings = settings_from({"fusion": "contrastive", "calibration": str(tmp_path / f"{label}.safetensors"),
                                  "lam": lam})
        worst = 0.0
        for name in sorted(sites):
            w_ft, w_al = ft[name].double(), al[name].double()
            c_h, c_t = grams[sites[name]]
            b = c_t + eps * np.eye(len(c_t))
            w_ref = w_ft.numpy() + (w_al - w_ft).numpy() @ np.linalg.solve((c_h + lam * b).T, c_h.T).T
            factors = term_factors(name, w_ft, w_al, None, settings)
            merged = write_fused(w_ft, factors, 1.0)[0].numpy()  # float64 weights: a float64 merge
            worst = max(worst, np.linalg.norm(merged - w_ref) / np.linalg.norm(w_ref - w_ft.numpy()))
        errors[label] = worst
    print(f"contrastive merge, eps {eps:g}, lam {lam:g}: largest relative error against the float64 closed form: "
          f"float64 file {errors['f64']:.2e}, float32 file {errors['f32']:.2e}")
    assert errors["f64"] <= 1e-6
    assert errors["f32"] > errors["f64"]
