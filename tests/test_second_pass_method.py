"""Issue 49, findings 3-6: parameter ranges declared once, an output that depends on
the inputs and parameters only, checks that live in the method, one plan per command.

Each test failed on the main this issue was filed against (c4c2c1d): ``alpha: -1``
merged, ``round_to`` did not exist (mergekit-yaml and merge_state_dicts differed in
their bits), and ``recipe.py`` was entered many times per command.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.merge_methods import merge_state_dicts

import mergekit_lssf.plan as plan_module
from helpers import load_state, run_cli, write_lssf_recipe
from mergekit_lssf import LSSFConfigError
from mergekit_lssf.parameters import PARAMETERS, readme_table
from mergekit_lssf.stats import STATS

ROOT = os.path.join(os.path.dirname(__file__), "..")
ROLES = {"al": "aligned", "un": "unaligned"}


@pytest.fixture()
def toys(toy_dir, tmp_path):
    """A private copy of the tiny toy models (tests here write beside them)."""
    for name in ("finetuned", "aligned", "unaligned"):
        shutil.copytree(toy_dir / name, tmp_path / name)
    return tmp_path


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- finding 3: ranges, declared once -------------------------------------------------

@pytest.mark.parametrize("parameters, message", [
    ({"alpha": -1}, r"parameters.alpha: lssf parameter `alpha` must satisfy 0 < alpha <= 2, got -1"),
    ({"alpha": 5}, r"parameters.alpha: lssf parameter `alpha` must satisfy 0 < alpha <= 2, got 5"),
    ({"alpha": 1.5}, r"tensor \S+: lssf parameter `alpha` must satisfy 0 < alpha <= 1 with `fusion: restore`"),
    ({"alpha": 3, "fusion": "add"}, r"parameters.alpha: .*0 < alpha <= 2, got 3"),
    ({"eta": 0}, r"parameters.eta: .*0 < eta <= 1, got 0"),
    ({"weight_max": 11}, r"parameters.weight_max: .*1 <= weight_max <= 10, got 11"),
    ({"max_rank": 0}, r"parameters.max_rank: .*an integer >= 1, got 0"),
    ({"rank": -3}, r"parameters.rank: .*an integer >= 1, got -3"),
    ({"alpha": [{"filter": "mlp", "value": 1.2}, {"value": 0.5}]}, r"tensor \S+mlp\S+: .*0 < alpha <= 1 with `fusion: restore`"),
    ({"alpha": 1.5, "fusion": [{"filter": "self_attn", "value": "add"}]}, r"tensor \S+: .*with `fusion: restore`.*, got 1.5"),
    ({"max_rank": 2.5}, r"parameters.max_rank: lssf parameter `max_rank` must be an integer, got 2.5"),
    ({"rank": 2, "round_to": "float16"}, r"parameters.round_to: `round_to: float16` but the recipe writes float32"),
])
def test_check_and_mergekit_yaml_refuse_out_of_range_values_alike(toys, parameters, message):
    """The same one-line error from `check` and `mergekit-yaml`, naming the field, the
    value and the range; nothing is written."""
    recipe = write_lssf_recipe(toys, "bad.yml", parameters)
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys, check=False)
    merged = run_cli(["mergekit-yaml", recipe, "out"], cwd=toys, check=False)
    assert checked.returncode == merged.returncode == 1
    assert re.search(message, _error_line(checked)), checked.stderr
    assert _error_line(checked).removeprefix("mergekit-lssf: error: ") == _error_line(merged).removeprefix(
        "mergekit-lssf: error: "), (checked.stderr, merged.stderr)
    assert "Traceback" not in checked.stderr + merged.stderr
    assert not os.path.exists(toys / "out")


def test_filters_that_never_meet_are_accepted(toys):
    """The rules apply per tensor: ``alpha: 1.5`` only where ``fusion: add`` is."""
    parameters = {"fusion": [{"filter": "mlp", "value": "add"}, {"value": "restore"}],
                  "alpha": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]}
    recipe = write_lssf_recipe(toys, "ok.yml", parameters)
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys)
    assert "`alpha: 1.5` with `fusion: add` is beyond the paper's range" in checked.stdout
    run_cli(["mergekit-yaml", recipe, "out"], cwd=toys)
    assert os.path.exists(toys / "out" / "model.safetensors")


def test_rounding_without_round_to_is_not_silently_ignored(toys):
    recipe = write_lssf_recipe(toys, "r.yml", {"rounding": "nearest"})
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys)
    assert "`parameters.rounding` says how lssf rounds to `round_to`, which the recipe does not set" in checked.stdout


def test_add_above_the_papers_alpha_warns(toys):
    recipe = write_lssf_recipe(toys, "add.yml", {"alpha": 1.5, "fusion": "add"})
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys)
    assert "`alpha: 1.5` with `fusion: add` is beyond the paper's range" in checked.stdout


def test_readme_parameter_table_is_the_declaration():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Parameters", 1)[1].strip()
    table = section.split("\n\n", 1)[0]
    assert table.strip() == readme_table().strip()
    for p in PARAMETERS:
        assert f"| `{p.name}` |" in table


def test_the_method_reads_the_declaration():
    """The spec mergekit binds is the declaration's: names, defaults, and validators
    that refuse what the declaration refuses."""
    from mergekit_lssf.merge_method import LSSF_METHOD

    spec = {p.name: p for p in LSSF_METHOD.spec.parameters}
    assert list(spec) == [p.name for p in PARAMETERS]
    for p in PARAMETERS:
        if not p.per_model:
            assert spec[p.name].default == p.default
    for name, bad in (("alpha", 2.5), ("eta", 0), ("weight_max", 0.5), ("max_rank", 0), ("fusion", "pull"),
                      ("round_to", "float32"), ("role", "safe")):
        with pytest.raises(Exception, match=f"`{name}` must"):
            spec[name].validate(bad)


def test_the_kernels_settings_refuse_what_a_recipe_may_not_say():
    from mergekit_lssf.kernel import lssf_fuse
    from mergekit_lssf.parameters import FusionSettings

    for bad in (dict(alpha=-1.0), dict(alpha=1.5), dict(eta=0.0), dict(max_rank=0), dict(rounding="down")):
        with pytest.raises(ValueError, match="must"):
            FusionSettings(fusion="restore", **bad)
    w = torch.eye(4)
    with pytest.raises(ValueError, match="pass its basis as `subspace=`"):
        lssf_fuse(w, w, torch.zeros(4, 4), FusionSettings(fusion="restore", subspace="u.safetensors"))


# ---- finding 5: every entry point refuses what mergekit-yaml refuses -------------------

def _state_dicts(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sds = {k: {} for k in ("ft", "al", "un")}
    for name, shape in {"model.layers.0.mlp.up_proj.weight": (24, 16), "model.norm.weight": (16,)}.items():
        base = torch.randn(shape, generator=g)
        sds["un"][name] = base.to(dtype)
        sds["al"][name] = (base + 0.3 * torch.randn(shape, generator=g)).to(dtype)
        sds["ft"][name] = (base + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return sds


def test_merge_state_dicts_checks_round_to_against_out_dtype():
    params = {"role": ROLES, "round_to": "float16"}
    with pytest.raises(LSSFConfigError, match="`round_to: float16` but out_dtype is bfloat16"):
        merge_state_dicts(_state_dicts(), "lssf", base="ft", out_dtype=torch.bfloat16, parameters=params)
    with pytest.warns(UserWarning, match="out_dtype bfloat16 without the lssf parameter `round_to: bfloat16`"):
        merge_state_dicts(_state_dicts(), "lssf", base="ft", out_dtype=torch.bfloat16, parameters={"role": ROLES})


def test_an_in_memory_gpt2_conv1d_is_refused_not_fused_on_the_wrong_side():
    g = torch.Generator().manual_seed(0)
    sds = {k: {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g)} for k in ("ft", "al", "un")}
    with pytest.raises(LSSFConfigError, match="h.0.attn.c_attn.weight: a GPT-2-style Conv1D weight"):
        merge_state_dicts(sds, "lssf", base="ft", parameters={"role": ROLES})


@pytest.mark.parametrize("parameters, message", [
    ({"alpha": -1}, "`alpha` must satisfy 0 < alpha <= 2, got -1"),
    ({"alpha": 1.5}, "`alpha` must satisfy 0 < alpha <= 1 with `fusion: restore`"),
    ({"eta": 2.0}, "`eta` must satisfy 0 < eta <= 1"),
    ({"round_to": "float32"}, "`round_to` must be one of bfloat16, float16"),
])
def test_merge_state_dicts_refuses_what_mergekit_yaml_refuses(parameters, message):
    with pytest.raises(Exception, match=re.escape(message)):
        merge_state_dicts(_state_dicts(), "lssf", base="ft", parameters={"role": ROLES, **parameters})


def test_a_run_merge_bound_before_the_hook_still_refuses(toys):
    """Without site processing the start-up hook never runs; a program that binds
    mergekit's run_merge before importing mergekit_lssf runs it unwrapped. The
    method's own checks still refuse ``alpha: -1`` before anything is written."""
    write_lssf_recipe(toys, "bad.yml", {"alpha": -1})
    program = (
        "import sys; sys.path[:0] = [%r, %r]\n"
        "import yaml\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.options import MergeOptions\n"
        "import mergekit_lssf\n"
        "assert not getattr(run_merge, 'lssf_wrapped', False)\n"
        "run_merge(MergeConfiguration.model_validate(yaml.safe_load(open('bad.yml'))), 'out', MergeOptions(quiet=True))\n"
    ) % (os.path.abspath(ROOT), sysconfig.get_paths()["purelib"])
    result = subprocess.run([sys.executable, "-S", "-c", program], cwd=toys, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "`alpha` must satisfy 0 < alpha <= 2, got -1" in result.stderr
    assert not os.path.exists(toys / "out") or not os.listdir(toys / "out")


# ---- finding 4: the bits depend on the inputs and the parameters only ------------------

@pytest.fixture(scope="module")
def bf16_toys(tmp_path_factory):
    """Tiny toy models stored in bf16, with a small safety term (written rounding matters)."""
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    root = tmp_path_factory.mktemp("bf16toys")
    build_toy_models(str(root), ToySpec(size="tiny"))
    for name in ("finetuned", "aligned", "unaligned"):
        path = root / name / "model.safetensors"
        from safetensors.torch import load_file, save_file
        state = load_file(path)
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path, metadata={"format": "pt"})
    return root


def test_every_entry_point_writes_the_same_bits(bf16_toys, tmp_path):
    """merge_state_dicts, mergekit-yaml and mergekit-multi, rank 2 restore into bf16."""
    for name in ("finetuned", "aligned", "unaligned"):
        shutil.copytree(bf16_toys / name, tmp_path / name)
    params = {"rank": 2, "round_to": "bfloat16"}
    recipe = write_lssf_recipe(tmp_path, "r.yml", params, out_dtype="bfloat16")
    run_cli(["mergekit-yaml", recipe, "yaml-out"], cwd=tmp_path)
    doc = yaml.safe_load(open(tmp_path / recipe))
    with open(tmp_path / "multi.yml", "w") as fp:
        yaml.safe_dump(doc, fp)  # one unnamed document: written to --out-path
    run_cli(["mergekit-multi", "multi.yml", "-I", "inter", "--out-path", "multi-out"], cwd=tmp_path)
    states = {k: load_state(tmp_path / v) for k, v in (("ft", "finetuned"), ("al", "aligned"), ("un", "unaligned"))}
    STATS.output_dtype = torch.float16  # process state from an earlier merge must not matter
    try:
        memory = merge_state_dicts(states, "lssf", base="ft", dtype=torch.float32, out_dtype=torch.bfloat16,
                                   parameters={"role": ROLES, **params})
    finally:
        STATS.output_dtype = None
    by_yaml, by_multi = load_state(tmp_path / "yaml-out"), load_state(tmp_path / "multi-out")
    fused = 0
    for name, tensor in memory.items():
        assert by_yaml[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(by_yaml[name], tensor), name
        assert torch.equal(by_multi[name], tensor), name
        fused += not torch.equal(tensor, states["ft"][name])
    assert fused > 0


def test_round_to_must_match_the_written_dtype(toys):
    recipe = write_lssf_recipe(toys, "r.yml", {"round_to": "bfloat16"}, out_dtype="float32")
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys, check=False)
    merged = run_cli(["mergekit-yaml", recipe, "out"], cwd=toys, check=False)
    expected = "parameters.round_to: `round_to: bfloat16` but the recipe writes float32"
    assert expected in _error_line(checked) and expected in _error_line(merged)
    assert not os.path.exists(toys / "out")


def test_sixteen_bit_output_without_round_to_warns_once(toys):
    recipe = write_lssf_recipe(toys, "r.yml", {"rank": 2}, out_dtype="bfloat16")
    checked = run_cli(["mergekit-lssf", "check", recipe], cwd=toys)
    merged = run_cli(["mergekit-yaml", recipe, "out"], cwd=toys)
    for text in (checked.stdout, merged.stderr):
        lines = [line for line in text.splitlines() if "without the lssf parameter `round_to: bfloat16`" in line]
        assert len(lines) == 1, text


# ---- finding 6: one plan per command ------------------------------------------------------

@pytest.fixture()
def plan_counter(monkeypatch):
    count = {"plans": 0}

    def counted(self):
        count["plans"] += 1

    monkeypatch.setattr(plan_module.LSSFPlan, "__post_init__", counted)
    return count


@pytest.mark.parametrize("command", ["check", "report", "extract-patch", "mergekit-yaml"])
def test_one_plan_per_command(toys, plan_counter, monkeypatch, command):
    from mergekit_lssf.cli import main

    monkeypatch.chdir(toys)
    recipe = write_lssf_recipe(toys, "r.yml", {"rank": 2})
    if command == "mergekit-yaml":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        config = MergeConfiguration.model_validate(yaml.safe_load(open(recipe)))
        run_merge(config, str(toys / "out"), MergeOptions(quiet=True))
    else:
        args = {"check": ["check", recipe], "report": ["report", recipe, "--out", "rep"],
                "extract-patch": ["extract-patch", recipe, "--out", "patch"]}[command]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert plan_counter["plans"] == 1


def test_a_plan_error_is_a_config_error_before_planning():
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate({
        "merge_method": "lssf", "base_model": "ft",
        "models": [{"model": "al", "parameters": {"role": "aligned"}},
                   {"model": "un", "parameters": {"role": "unaligned"}}],
        "parameters": {"alpha": 0}})
    with pytest.raises(LSSFConfigError, match=r"parameters.alpha: .*0 < alpha <= 2, got 0"):
        plan_module.plan_recipe(config, needs_weights=False)
