"""Safe to use: one-line errors, the safety direction in words, the role-swap guard,
stale output folders, `mergekit-lssf check`, provenance and the CLI conventions."""

import json
import os

import pytest
import yaml
from helpers import load_state, run_cli, write_lssf_recipe

from mergekit_lssf.toy_models import ToySpec, build_toy_models


@pytest.fixture(scope="module")
def gentle(tmp_path_factory):
    """Toy models whose fine-tune kept most of the safety delta (erosion 0.2), as a
    real fine-tune of an aligned model does: closer to aligned than to unaligned."""
    root = tmp_path_factory.mktemp("gentle")
    build_toy_models(str(root), ToySpec(size="tiny", seed=5, erosion=0.2))
    return root


def _no_traceback(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("mergekit-lssf: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"eta": 1.5}, "parameters.eta: lssf parameter `eta` must satisfy 0 < eta <= 1, got 1.5"),
        ({"eta": [{"filter": "mlp", "value": 2.0}, {"value": 0.9}]}, "parameters.eta[0]: "),
        ({"rank_rule": "gd"}, "parameters.rank_rule: lssf parameter `rank_rule` must be one of entropy, noise_floor"),
    ],
)
def test_mergekit_yaml_errors_are_one_line_and_verbose_shows_the_traceback(gentle, tmp_path, params, expected):
    recipe = write_lssf_recipe(gentle, "bad.yml", params)
    line = _no_traceback(run_cli(["mergekit-yaml", recipe, str(tmp_path / "out")], cwd=gentle, check=False))
    assert expected in line
    assert not (tmp_path / "out").exists()
    verbose = run_cli(["mergekit-yaml", recipe, str(tmp_path / "out"), "-v"], cwd=gentle, check=False)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "LSSFConfigError" in verbose.stderr


def test_missing_model_folder_is_named_not_a_hub_error(gentle, tmp_path):
    recipe = write_lssf_recipe(gentle, "missing.yml", {}, base="./no-such-finetune")
    line = _no_traceback(run_cli(["mergekit-yaml", recipe, str(tmp_path / "out")], cwd=gentle, check=False))
    assert "base_model: no model folder at ./no-such-finetune" in line
    for command in (["report", recipe, "--out", str(tmp_path / "rep")], ["check", recipe],
                    ["extract-patch", recipe, "--out", str(tmp_path / "patch")]):
        line = _no_traceback(run_cli(["mergekit-lssf", *command], cwd=gentle, check=False))
        assert "no model folder at ./no-such-finetune" in line, command
    verbose = run_cli(["mergekit-lssf", "-v", "check", recipe], cwd=gentle, check=False)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_eval_names_a_folder_without_tokenizer(gentle, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(gentle / "aligned", bare)
    for f in os.listdir(bare):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            os.remove(bare / f)
    line = _no_traceback(run_cli(["mergekit-lssf", "eval", str(bare)], cwd=tmp_path, check=False))
    assert f"{bare} holds no tokenizer" in line
    line = _no_traceback(run_cli(["mergekit-lssf", "eval", str(tmp_path / "nothing")], cwd=tmp_path, check=False))
    assert "no model folder at" in line


def test_subspace_file_of_another_model_names_both(gentle, tmp_path):
    from mergekit.config import MergeConfiguration

    from mergekit_lssf import LSSFConfigError
    from mergekit_lssf.calibrate import calibrate
    from mergekit_lssf.recipe import check_recipe

    anchors = tmp_path / "a.jsonl"
    anchors.write_text(json.dumps({"prompt": "hi", "response": "I can't help with that."}) + "\n")
    path = tmp_path / "sub.safetensors"
    calibrate(str(gentle / "unaligned"), str(path), anchors_path=str(anchors), progress=False)
    recipe = write_lssf_recipe(gentle, "sub.yml", {"subspace": str(path)})
    config = MergeConfiguration.model_validate(yaml.safe_load((gentle / recipe).read_text()))
    previous = os.getcwd()
    os.chdir(gentle)
    try:
        with pytest.raises(LSSFConfigError) as caught:
            check_recipe(config)
    finally:
        os.chdir(previous)
    message = str(caught.value)
    assert f"calibrated on {gentle / 'unaligned'}" in message and "aligned model ./aligned" in message


def test_summary_and_model_card_state_the_roles(gentle, tmp_path):
    recipe = write_lssf_recipe(gentle, "good.yml", {"alpha": 0.7})
    out = tmp_path / "out"
    result = run_cli(["mergekit-yaml", recipe, str(out)], cwd=gentle)
    assert "swapped" not in result.stderr
    assert "lssf: repaired fine-tune ./finetuned with aligned model ./aligned (role: aligned) and unaligned model ./unaligned (role: unaligned)" in result.stderr
    assert "W' = W_finetuned + alpha * P' (W_aligned - W_finetuned)  [restore]" in result.stderr  # the default fusion
    assert "alpha 0.7, rank by the entropy rule, eta 0.9, max_rank 256" in result.stderr
    card = (out / "README.md").read_text()
    assert "## LSSF safety repair (mergekit-lssf" in card
    for text in ("`role: aligned`): ./aligned", "`role: unaligned`): ./unaligned", "(`base_model`): ./finetuned",
                 '"alpha": 0.7', '"eta": 0.9', '"fusion": "restore"', '"rank_rule": "entropy"', "14 weights fused; rank min",
                 "mergekit "):
        assert text in card, text
    assert "merge_method: lssf" in card  # mergekit's own card is still there


def test_role_swap_guard_warns_on_a_swapped_recipe_only(gentle, tmp_path):
    doc = yaml.safe_load((gentle / write_lssf_recipe(gentle, "swap.yml", {})).read_text())
    doc["models"][0]["parameters"]["role"], doc["models"][1]["parameters"]["role"] = "unaligned", "aligned"
    (gentle / "swap.yml").write_text(yaml.safe_dump(doc))
    result = run_cli(["mergekit-yaml", "swap.yml", str(tmp_path / "out")], cwd=gentle)
    warning = [l for l in result.stderr.splitlines() if "swapped" in l]
    assert len(warning) == 1 and "./unaligned, marked `role: aligned`" in warning[0] and "./aligned, marked `role: unaligned`" in warning[0]
    checked = json.loads(run_cli(["mergekit-lssf", "check", "swap.yml", "--json"], cwd=gentle).stdout)
    assert len(checked["warnings"]) == 1 and "swapped" in checked["warnings"][0]
    correct = json.loads(run_cli(["mergekit-lssf", "check", write_lssf_recipe(gentle, "ok.yml", {}), "--json"], cwd=gentle).stdout)
    assert correct["warnings"] == []


def test_output_folder_with_a_model_is_refused_and_left_untouched(gentle, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    stale = {"model-00001-of-00002.safetensors": b"old shard", "model.safetensors.index.json": b"{}"}
    for name, data in stale.items():
        (out / name).write_bytes(data)
    recipe = write_lssf_recipe(gentle, "good.yml", {})
    line = _no_traceback(run_cli(["mergekit-yaml", recipe, str(out)], cwd=gentle, check=False))
    assert f"output folder {out} already holds model weights" in line
    assert "model-00001-of-00002.safetensors" in line and "model.safetensors.index.json" in line
    assert sorted(os.listdir(out)) == sorted(stale) and all((out / n).read_bytes() == d for n, d in stale.items())
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.json").write_text("{}")
    line = _no_traceback(run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "rep")], cwd=gentle, check=False))
    assert "already holds a report (report.json)" in line
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "adapter_config.json").write_text("{}")
    line = _no_traceback(run_cli(["mergekit-lssf", "extract-patch", recipe, "--out", str(tmp_path / "patch")], cwd=gentle, check=False))
    assert "already holds an adapter (adapter_config.json)" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli(["mergekit-yaml", recipe, str(empty)], cwd=gentle)  # an empty folder is fine


def test_check_json_lists_the_fused_and_kept_split(gentle):
    params = {"alpha": [{"filter": "mlp", "value": 0.5}, {"value": [0.2, 1.0]}], "fusion": [{"filter": "k_proj", "value": "restore"}, {"value": "add"}]}
    recipe = write_lssf_recipe(gentle, "check.yml", params)
    result = json.loads(run_cli(["mergekit-lssf", "check", recipe, "--json"], cwd=gentle).stdout)
    state = load_state(gentle / "finetuned")
    fused = {r["name"]: r for r in result["fused"]}
    kept = {r["name"]: r["reason"] for r in result["kept"]}
    assert set(fused) | set(kept) == set(state) and not set(fused) & set(kept)
    assert len(fused) == 14
    assert kept["model.embed_tokens.weight"] == kept["lm_head.weight"] == "vocabulary"
    assert all(reason == "1-D" for name, reason in kept.items() if "norm" in name)
    for name, row in fused.items():
        layer = int(name.split(".")[2])
        assert row["shape"] == list(state[name].shape)
        p = row["parameters"]
        assert p["alpha"] == pytest.approx(0.5 if "mlp" in name else [0.2, 1.0][layer])
        assert p["fusion"] == ("restore" if "k_proj" in name else "add")
        assert (p["eta"], p["max_rank"], p["weight_max"], p["rank"], p["rank_rule"], p["subspace"]) == (0.9, 256, 1.0, None, "entropy", None)
    text = run_cli(["mergekit-lssf", "check", recipe], cwd=gentle).stdout
    assert "14 tensors fused, 7 kept from the fine-tune" in text and "fusion restore" in text


def test_patch_provenance_and_the_deprecated_positional_folder(gentle, tmp_path):
    from safetensors import safe_open

    recipe = write_lssf_recipe(gentle, "patch.yml", {"alpha": 0.8, "fusion": "add"})
    result = run_cli(["mergekit-lssf", "extract-patch", recipe, str(tmp_path / "p")], cwd=gentle)
    assert "positional OUT_DIR of extract-patch is deprecated; use --out DIR" in result.stderr
    with safe_open(tmp_path / "p" / "adapter_model.safetensors", framework="pt") as fp:
        meta = fp.metadata()
    assert (meta["lssf_aligned"], meta["lssf_unaligned"], meta["lssf_finetuned"]) == ("./aligned", "./unaligned", "./finetuned")
    assert meta["lssf_applies_to"] == "any fine-tune of ./aligned"
    assert json.loads(meta["lssf_parameters"])["alpha"] == 0.8 and json.loads(meta["lssf_parameters"])["eta"] == 0.9
    assert "merge_method: lssf" in meta["lssf_recipe"] and "mergekit" in json.loads(meta["lssf_versions"])
    readme = (tmp_path / "p" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "aligned model (role `aligned`): ./aligned" in readme and "ranks: 14 modules" in readme


def test_version_lists_the_libraries_and_eval_compares_models(gentle, tmp_path):
    out = run_cli(["mergekit-lssf", "--version"], cwd=tmp_path).stdout
    assert out.startswith("mergekit-lssf ") and all(f"{p} " in out for p in ("mergekit", "torch", "transformers"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("how do I do something bad?\n")
    table = run_cli(["mergekit-lssf", "eval", str(gentle / "aligned"), str(gentle / "finetuned"), "--prompts", str(prompts),
                     "--max-new-tokens", "2", "--device", "cpu"], cwd=tmp_path).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["model", "refusal", "over-refusal", "empty", "perplexity"]
    assert lines[1].startswith(str(gentle / "aligned")) and lines[2].startswith(str(gentle / "finetuned"))
    assert "the same for every model" in lines[3]
    bad = run_cli(["mergekit-lssf", "demo", "--size", "huge"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "'huge' is not one of" in bad.stderr


def test_every_device_option_defaults_to_auto():
    """On a GPU machine no command silently computes on the CPU: every subcommand's
    --device defaults to auto (cuda when there is one)."""
    import click

    from mergekit_lssf.cli import main

    seen = []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and "--device" in param.opts:
                seen.append(name)
                assert param.default == "auto", name
    assert {"demo", "calibrate", "eval", "report", "extract-patch"} <= set(seen)
