"""Issue 49, second-pass review: findings 1 (a swapped ``model+lora`` recipe), 2 (the
role heuristic cries wolf), 10 (``check`` on a ``mergekit-multi`` recipe) and 11 (a
user's files replaced or deleted)."""

import json
import os
import shutil

import pytest
import yaml
from helpers import run_cli

from mergekit_lssf.toy_models import ToySpec, build_toy_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lora(aligned: str, out: str) -> None:
    """A real PEFT LoRA adapter of ``aligned`` with nonzero factors (a fine-tune's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    """Demo-like toy models (the fine-tune erased the whole planted delta), a LoRA of
    the aligned model and a byte-identical copy of the aligned model under another path."""
    root = tmp_path_factory.mktemp("second-pass")
    build_toy_models(str(root), ToySpec(size="tiny", seed=7))
    _lora(str(root / "aligned"), str(root / "lora"))
    shutil.copytree(root / "aligned", root / "aligned-copy")
    return root


def _recipe(root, name, base, aligned, unaligned, **parameters):
    doc = {"merge_method": "lssf", "base_model": base, "dtype": "float32", "parameters": parameters,
           "models": [{"model": aligned, "parameters": {"role": "aligned"}},
                      {"model": unaligned, "parameters": {"role": "unaligned"}}]}
    (root / name).write_text(yaml.safe_dump(doc))
    return name


def _one_error_line(result):
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mergekit-lssf: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# Finding 1 -------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["./aligned+./lora", "./aligned-copy+./lora"])
def test_swapped_model_plus_lora_recipe_is_a_hard_error(toys, tmp_path, base):
    """Finding 1: ``base_model: ALIGNED+LORA`` with ALIGNED marked ``role: unaligned`` is
    one error line naming both models, in ``check`` and ``mergekit-yaml``, before any
    weight is written; matched by path, or by fingerprint when the paths differ."""
    recipe = _recipe(toys, "swapped-lora.yml", base, "./unaligned", "./aligned")
    line = _one_error_line(run_cli(["mergekit-lssf", "check", recipe], cwd=toys, check=False))
    assert base in line and "./aligned" in line and "./unaligned" in line and "swapped" in line, line
    out, cache = tmp_path / "out", tmp_path / "cache"
    line = _one_error_line(run_cli(["mergekit-yaml", recipe, str(out), "--lora-merge-cache", str(cache)],
                                   cwd=toys, check=False))
    assert base in line and "`role: unaligned` (./aligned)" in line and "`role: aligned` (./unaligned)" in line, line
    assert not out.exists() or not os.listdir(out)
    assert not cache.exists() or not os.listdir(cache)


def test_correct_model_plus_lora_recipe_passes_check(toys):
    """Finding 1: the same recipe with the roles right is not refused."""
    recipe = _recipe(toys, "good-lora.yml", "./aligned+./lora", "./aligned", "./unaligned")
    checked = json.loads(run_cli(["mergekit-lssf", "check", recipe, "--json"], cwd=toys).stdout)
    assert checked["fused"] and not any("swapped" in w for w in checked["warnings"])


# Finding 2 -------------------------------------------------------------------------

def _role_warning(root, aligned="aligned", unaligned="unaligned"):
    from mergekit.common import ModelReference

    from mergekit_lssf.guards import model_index, role_swap_warning

    refs = [ModelReference.model_validate(str(root / n)) for n in ("finetuned", aligned, unaligned)]
    names = sorted(n for n in model_index(refs[0]) if n.endswith(("k_proj.weight", "v_proj.weight")))
    return role_swap_warning(*refs, names)


@pytest.mark.parametrize("erosion", [0.0, 0.2, 0.6, 0.9, 1.0, 1.3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_role_check_is_quiet_on_a_correct_recipe_however_much_safety_was_erased(tmp_path, erosion, dtype):
    """Finding 2: a fine-tune that walked most (or all, or past all) of the way back to
    the unaligned weights along the safety directions -- what LSSF exists to repair --
    draws no role warning; the same models with the roles swapped do."""
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=11, erosion=erosion, dtype=dtype))
    assert _role_warning(tmp_path) is None
    swapped = _role_warning(tmp_path, aligned="unaligned", unaligned="aligned")
    assert swapped and "were the roles swapped?" in swapped
    assert f"{tmp_path / 'unaligned'}, marked `role: aligned`" in swapped


def test_role_check_switch_silences_it(tmp_path, monkeypatch):
    """Finding 2: MERGEKIT_LSSF_ROLE_CHECK=0 is the one switch."""
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=12, erosion=0.2))
    assert _role_warning(tmp_path, aligned="unaligned", unaligned="aligned")
    monkeypatch.setenv("MERGEKIT_LSSF_ROLE_CHECK", "0")
    assert _role_warning(tmp_path, aligned="unaligned", unaligned="aligned") is None


def test_demo_does_not_warn_on_its_own_recipe(tmp_path):
    """Finding 2: ``mergekit-lssf demo`` prints no role warning on its correct recipe,
    on any path (merge, pre-flight, the rank table), without MERGEKIT_LSSF_ROLE_CHECK."""
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_LSSF_ROLE_CHECK"}
    result = run_cli(["mergekit-lssf", "demo", "--size", "tiny", "--workdir", str(tmp_path / "demo")], cwd=tmp_path,
                     env=env)
    assert "swapped" not in result.stdout + result.stderr, result.stderr[-3000:]


# Finding 10 ------------------------------------------------------------------------

def test_check_of_the_shipped_multi_document_recipe(tmp_path):
    """Finding 10: ``mergekit-lssf check recipes/ties-then-lssf.yml`` (as a user runs it)
    checks both documents and says the lssf one's input is not there yet."""
    result = run_cli(["mergekit-lssf", "check", "recipes/ties-then-lssf.yml"], cwd=ROOT)
    assert "document 0 (name: ties-finetunes): merge_method ties" in result.stdout
    assert "document 1 (unnamed: the final merge): merge_method lssf" in result.stdout
    assert "exists only once mergekit-multi has run it" in result.stdout
    as_json = json.loads(run_cli(["mergekit-lssf", "check", "recipes/ties-then-lssf.yml", "--json"], cwd=ROOT).stdout)
    assert [d["checked"] for d in as_json["documents"]] == ["parsed", "recipe"]


def _multi(root, name, docs):
    (root / name).write_text(yaml.safe_dump_all(docs))
    return name


def _lssf_doc(base, **parameters):
    return {"merge_method": "lssf", "base_model": base, "dtype": "float32", "parameters": parameters,
            "models": [{"model": "./aligned", "parameters": {"role": "aligned"}},
                       {"model": "./unaligned", "parameters": {"role": "unaligned"}}]}


def test_check_of_broken_multi_document_recipes(toys):
    """Finding 10: a broken document is named by index and name; references between
    documents must name an earlier document; local lssf documents get the full check."""
    stage = {"name": "stage-one", "merge_method": "linear", "models": [
        {"model": "./finetuned", "parameters": {"weight": 0.5}}, {"model": "./aligned", "parameters": {"weight": 0.5}}],
        "dtype": "float32"}
    ok = _multi(toys, "multi-ok.yml", [stage, {"name": "repair", **_lssf_doc("stage-one")}, _lssf_doc("./finetuned")])
    checked = json.loads(run_cli(["mergekit-lssf", "check", ok, "--json"], cwd=toys).stdout)["documents"]
    assert [d["checked"] for d in checked] == ["parsed", "recipe", "full"]
    assert checked[1]["inputs_from"] == [{"index": 0, "name": "stage-one"}] and checked[2]["fused"]

    bad_value = _multi(toys, "multi-eta.yml", [stage, {"name": "repair", **_lssf_doc("stage-one", eta=1.5)}])
    line = _one_error_line(run_cli(["mergekit-lssf", "check", bad_value], cwd=toys, check=False))
    assert "document 1 (name: repair)" in line and "eta" in line, line

    later = _multi(toys, "multi-later.yml", [_lssf_doc("stage-one"), stage])
    line = _one_error_line(run_cli(["mergekit-lssf", "check", later], cwd=toys, check=False))
    assert "document 0 (unnamed: the final merge)" in line and "document 1 (name: stage-one), which comes later" in line

    typo = _multi(toys, "multi-typo.yml", [stage, _lssf_doc("stage-on")])
    line = _one_error_line(run_cli(["mergekit-lssf", "check", typo], cwd=toys, check=False))
    assert "document 1" in line and "did you mean 'stage-one'" in line, line

    invalid = _multi(toys, "multi-invalid.yml", [{**stage, "merge_method": 3}, _lssf_doc("stage-one")])
    line = _one_error_line(run_cli(["mergekit-lssf", "check", invalid], cwd=toys, check=False))
    assert "document 0 (name: stage-one): not a valid mergekit recipe" in line, line


# Finding 11 ------------------------------------------------------------------------

def test_merge_refuses_an_output_folder_holding_the_users_readme(toys, tmp_path):
    """Finding 11: a README.md of the user's (no weights) in the output folder is
    neither replaced nor appended to: one line naming it, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    recipe = _recipe(toys, "plain.yml", "./finetuned", "./aligned", "./unaligned")
    line = _one_error_line(run_cli(["mergekit-yaml", recipe, str(out)], cwd=toys, check=False))
    assert f"output folder {out} already holds" in line and "README.md" in line, line
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "my notes\n"


def test_demo_deletes_and_replaces_only_what_it_created(tmp_path):
    """Finding 11: ``demo --workdir DIR`` removes DIR/merged only when the demo made it
    (its marker file), and writes into DIR only when DIR is new, empty or the demo's;
    otherwise one line saying what to remove, and nothing written or deleted."""
    marker = ".mergekit-lssf-demo"  # mergekit_lssf.demo.DEMO_MARKER, written out so the test runs on older code
    cases = {  # workdir -> {file: text} before the run
        "merged-of-mine": {"merged/thesis.txt": "precious"},
        "demo-dir-with-my-merged": {marker: "", "merged/thesis.txt": "precious"},
        "my-dir": {"demo.yml": "my own recipe"},
    }
    for name, files in cases.items():
        workdir = tmp_path / name
        for rel, text in files.items():
            (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            (workdir / rel).write_text(text)
        result = run_cli(["mergekit-lssf", "demo", "--size", "tiny", "--workdir", str(workdir)], cwd=tmp_path, check=False)
        line = _one_error_line(result)
        assert "mergekit-lssf demo`" in line and "remove" in line, (name, line)
        found = {str(p.relative_to(workdir)): p.read_text() for p in workdir.rglob("*") if p.is_file()}
        assert found == files, name
