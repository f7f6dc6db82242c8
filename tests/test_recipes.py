"""Every shipped recipe validates; every recipe error names its field."""

import glob
import os

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_lssf import LSSFConfigError
from mergekit_lssf.recipe import check_recipe, dtype_warning

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
# examples in recipes/, the demo recipes inside the package (the demo reads them from there)
ALL_RECIPES = sorted(
    glob.glob(os.path.join(ROOT, "recipes", "*.yml")) + glob.glob(os.path.join(ROOT, "mergekit_lssf", "recipes", "*.yml"))
)
# demo-calibrated.yml needs the subspace file the demo makes: test_end_to_end runs it
def _has_lssf_stage(path):
    with open(path, encoding="utf-8") as fp:
        return any(d and d.get("merge_method") == "lssf" for d in yaml.safe_load_all(fp))


#: the lssf recipes (recipes/interpolate-baseline.yml is mergekit's `linear`; test_walkthrough merges it)
RECIPES = [p for p in ALL_RECIPES if not p.endswith("demo-calibrated.yml") and _has_lssf_stage(p)]


def _local_paths(value):
    """Every ./relative model path (both sides of model+lora) in a recipe document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _local_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from _local_paths(v)
    elif isinstance(value, str):
        for part in value.split("+"):
            if part.startswith("./"):
                yield part


@pytest.fixture(autouse=True)
def placeholder_models(tmp_path, monkeypatch):
    """Model folders (config and a weight file, no safetensors) for every local path the
    recipes name, so that the folder check passes and the header checks have nothing to read."""
    docs = [GOOD]
    for path in ALL_RECIPES:
        with open(path, encoding="utf-8") as fp:
            docs += [d for d in yaml.safe_load_all(fp) if d]
    for folder in {p for d in docs for p in _local_paths(d)}:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        name = "adapter_config.json" if "lora" in folder else "config.json"
        (tmp_path / folder / name).write_text("{}")
        (tmp_path / folder / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)


def test_missing_model_folders_are_named(tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "al")
    with pytest.raises(LSSFConfigError, match=r"models\[0\]: no model folder at ./al"):
        check_recipe(_with())
    (tmp_path / "un" / "pytorch_model.bin").unlink()
    with pytest.raises(LSSFConfigError, match=r"models\[1\]: ./un holds no weights"):
        check_recipe(_with(models__0__model="./ft"))


def _lssf_stages(path):
    with open(path, encoding="utf-8") as fp:
        docs = [d for d in yaml.safe_load_all(fp) if d]
    for doc in docs:
        doc.pop("name", None)
        config = MergeConfiguration.model_validate(doc)
        if config.merge_method == "lssf":
            yield config


def test_recipes_exist():
    names = {os.path.basename(p) for p in ALL_RECIPES}
    assert {"demo.yml", "demo-calibrated.yml", "llama31-8b-lora.yml", "qwen25-7b-lora.yml", "ties-then-lssf.yml",
            "harmful-finetune-reference.yml", "llama31-8b-lora-paper.yml", "qwen25-7b-lora-paper.yml"} <= names


@pytest.mark.parametrize("path", ALL_RECIPES, ids=os.path.basename)
def test_shipped_recipes_use_the_default_fusion_unless_named_for_the_paper(path):
    """A user copying a shipped recipe gets the package default (restore); only a
    ``*-paper.yml`` recipe sets the paper's ``fusion: add``, and it says when to use it."""
    with open(path, encoding="utf-8") as fp:
        text = fp.read()
    fusions = [c.parameters.get("fusion") for c in _lssf_stages(path)] if path in RECIPES else []
    if path.endswith("-paper.yml"):
        assert fusions and all(f == "add" for f in fusions), path
        assert "reproduce the paper" in text and "restore" in text
    else:
        assert all(f in (None, "restore") for f in fusions), (path, fusions)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_shipped_recipe_validates(path):
    stages = list(_lssf_stages(path))
    assert stages, f"{path} has no lssf stage"
    for config in stages:
        refs = check_recipe(config)
        assert set(refs) == {"aligned", "unaligned"}


@pytest.mark.parametrize("path", ALL_RECIPES, ids=os.path.basename)
def test_shipped_recipes_compute_in_float32(path):
    """Every stage of every shipped recipe computes in float32; the examples for real
    (bf16) checkpoints write bf16 with `out_dtype`, so no stage draws the dtype warning."""
    with open(path, encoding="utf-8") as fp:
        docs = [d for d in yaml.safe_load_all(fp) if d]
    for doc in docs:
        assert doc.get("dtype") == "float32", (path, doc.get("dtype"))
        if "/recipes/" in path.replace(os.sep, "/") and "mergekit_lssf" not in path:
            assert doc.get("out_dtype") == "bfloat16", path
    for config in _lssf_stages(path) if path in RECIPES else []:  # demo-calibrated: test_end_to_end
        assert dtype_warning(config, check_recipe(config)) is None


def test_lora_recipe_references_an_adapter():
    (config,) = _lssf_stages(os.path.join(ROOT, "recipes", "llama31-8b-lora.yml"))
    assert config.base_model.lora is not None


GOOD = {
    "merge_method": "lssf",
    "base_model": "./ft",
    "models": [
        {"model": "./al", "parameters": {"role": "aligned"}},
        {"model": "./un", "parameters": {"role": "unaligned"}},
    ],
    "parameters": {"alpha": 0.8, "eta": 0.9},
}


def _with(**changes):
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return MergeConfiguration.model_validate(doc)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"base_model": None}, "requires the recipe field `base_model`"),
        ({"parameters__etaa": 0.9}, r"parameters.etaa: unknown lssf parameter `etaa`"),
        ({"parameters__eta": 1.2}, r"parameters.eta: lssf parameter `eta` must satisfy 0 < eta <= 1, got 1.2"),
        ({"parameters__weight_max": 0.9}, r"parameters.weight_max: .*must satisfy 1 <= weight_max <= 10, got 0.9"),
        ({"parameters__max_rank": 0}, r"parameters.max_rank: .*integer >= 1"),
        ({"parameters__rank": 0}, r"parameters.rank: .*integer >= 1"),
        ({"parameters__subspace": "u.safetensors"}, r"parameters.subspace: lssf parameter `subspace`: no such file 'u.safetensors'"),
        ({"parameters__alpha": [{"filter": "mlp", "value": "x"}, {"value": 1.0}]}, r"parameters.alpha\[0\]: .*`alpha` must satisfy 0 < alpha <= 2, got 'x'"),
        ({"parameters__eta": [0.5, 1.5]}, r"parameters.eta\[1\]: .*got 1.5"),
        ({"parameters__eta": [{"filter": "mlp", "value": [0.5, 0]}, {"value": 0.9}]}, r"parameters.eta\[0\].value\[1\]: .*got 0"),
        ({"parameters__fusion": "pull"}, r"parameters.fusion: .*one of add, restore, contrastive, got 'pull'"),
        ({"parameters__spectrum": "above"}, r"parameters.spectrum: .*one of full, signal, got 'above'"),
        ({"parameters__rounding": "down"}, r"parameters.rounding: .*one of subspace, nearest, got 'down'"),
        ({"parameters__spectrum": "signal", "parameters__rank_rule": "noise_floor"}, r"parameters.spectrum: .*does nothing with"),
        ({"parameters__spectrum": [{"filter": "mlp", "value": "signal"}, {"value": "full"}], "parameters__rank": 8},
         r"parameters.spectrum: .*does nothing with a fixed `rank`"),
        ({"parameters__role": "aligned"}, r"parameters.role: `role` is a per-model parameter"),
        ({"models__0__parameters__alpha": 0.5}, r"models\[0\].parameters.alpha: `alpha` is a recipe-level"),
        ({"models__0__parameters__weight": 0.5}, r"models\[0\].parameters.weight: unknown lssf per-model"),
        ({"models__0__parameters__role": "safe"}, r"models\[0\].parameters.role: .*must be one of aligned, unaligned, got 'safe'"),
        ({"models__1__parameters__role": "aligned"}, r"exactly one model with `role: aligned`; the recipe has 2"),
        ({"models__1__parameters": None}, r"models\[1\]: model ./un needs `parameters: \{role: aligned\}`"),
    ],
)
def test_recipe_errors_name_the_field(changes, message):
    with pytest.raises(LSSFConfigError, match=message):
        check_recipe(_with(**changes))


def test_base_model_with_a_role_is_refused():
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    doc["models"].append({"model": "./ft", "parameters": {"role": "aligned"}})
    with pytest.raises(LSSFConfigError, match="is the `base_model`.*must not carry a role"):
        check_recipe(MergeConfiguration.model_validate(doc))


def test_gradient_ranks_round_to_integers():
    check_recipe(_with(parameters__max_rank=[8, 64], parameters__eta=[0.8, 0.95]))
