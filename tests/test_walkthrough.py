"""The README's "Repair your fine-tune in four steps", run as written.

Every command of the section's bash blocks is read from README.md (not copied here) and
run by bash in one working folder, in order, on generated stand-ins for the downloads:
small bf16 Llama-shaped models in ``./hub/`` for the two hub ids and a real PEFT LoRA
adapter of the Instruct stand-in in ``./my-lora``. ``recipe.yml`` is the section's
recipe and ``baseline.yml`` the shipped ``recipes/interpolate-baseline.yml``, with the hub
ids replaced by the stand-ins' folders and nothing else changed.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import load_state
from mergekit_lssf.toy_models import ToySpec, build_toy_models

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SECTION = "## Repair your fine-tune in four steps"
BASELINE = os.path.join(ROOT, "recipes", "interpolate-baseline.yml")
# what each hub id stands for; a local folder spelled ./x/y (mergekit's model card asks the
# hub about any existing "org/name" folder, so the stand-ins are not named like hub ids)
STAND_INS = [("meta-llama/Llama-3.1-8B-Instruct", "./hub/Llama-3.1-8B-Instruct"),
             ("meta-llama/Llama-3.1-8B", "./hub/Llama-3.1-8B")]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _section() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fp:
        text = fp.read()
    assert SECTION in text, f"README.md has no {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def _blocks(language: str):
    return [body for lang, body in BLOCK.findall(_section()) if lang == language]


def _commands():
    """Every command line of the section's bash blocks, in order (comments left to bash)."""
    lines = []
    for body in _blocks("bash"):
        lines += [line for line in body.replace("\\\n", " ").splitlines() if line.split("#")[0].strip()]
    return lines


def _localised(text: str) -> str:
    for hub_id, folder in STAND_INS:
        text = text.replace(hub_id, folder)
    return text


def _run(line: str, cwd) -> subprocess.CompletedProcess:
    import time

    t0 = time.time()
    try:
        return _run_(line, cwd)
    finally:
        print(f"{time.time() - t0:6.1f} s  {line}")


def _run_(line: str, cwd) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)
    # one BLAS thread: the stand-ins are too small to gain from more, and on a shared 2-core
    # machine two spinning threads made eval's 102 greedy answers 60x slower (measured)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def _stand_ins(work) -> None:
    build_toy_models(str(work / "toy"), ToySpec(dtype="bfloat16"))
    (work / "hub").mkdir()
    shutil.move(str(work / "toy" / "aligned"), str(work / "hub" / "Llama-3.1-8B-Instruct"))
    shutil.move(str(work / "toy" / "unaligned"), str(work / "hub" / "Llama-3.1-8B"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "hub" / "Llama-3.1-8B-Instruct"), dtype=torch.float32)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(str(work / "my-lora"))


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """{command line: finished process}, every command of the section run in order."""
    work = tmp_path_factory.mktemp("walkthrough")
    _stand_ins(work)
    (recipe,) = _blocks("yaml")
    (work / "recipe.yml").write_text(_localised(recipe))
    with open(BASELINE, encoding="utf-8") as fp:
        (work / "baseline.yml").write_text(_localised(fp.read()))
    commands = _commands()
    assert any("recipe.yml" in c for c in commands) and any("baseline.yml" in c for c in commands), commands
    done = {}
    for line in commands:
        result = _run(line, work)
        assert result.returncode == 0, f"README: `{line}` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        done[line] = result
    return work, done


def _step(done, words: str) -> subprocess.CompletedProcess:
    (result,) = [r for line, r in done.items() if line.split("#")[0].strip().startswith(words)]
    return result


def test_the_walkthrough_has_the_four_steps():
    starts = [c.split()[:2] for c in _commands()]
    for step in (["mergekit-lssf", "check"], ["mergekit-yaml", "recipe.yml"], ["mergekit-lssf", "eval"],
                 ["mergekit-lssf", "extract-patch"]):
        assert step in starts, (step, starts)


def test_the_readme_recipe_is_the_shipped_one():
    """"copy recipes/llama31-8b-lora.yml": the README's recipe is that file's, except
    parameters the file spells out at their defaults."""
    from mergekit_lssf.parameters import DEFAULTS

    (shown,) = [yaml.safe_load(b) for b in _blocks("yaml")]
    with open(os.path.join(ROOT, "recipes", "llama31-8b-lora.yml"), encoding="utf-8") as fp:
        shipped = yaml.safe_load(fp)
    shown_parameters, shipped_parameters = shown.pop("parameters", {}), shipped.pop("parameters", {})
    assert shown == shipped
    for name, value in shipped_parameters.items():
        assert shown_parameters.get(name, DEFAULTS[name]) == value, (name, value)
    assert set(shown_parameters) <= set(shipped_parameters)


def test_check_lists_every_tensor_and_ends_with_the_count(walkthrough):
    _, done = walkthrough
    out = _step(done, "mergekit-lssf check").stdout
    assert re.search(r"^kept .*\(vocabulary\)$", out, re.M) and re.search(r"^kept .*\(1-D\)$", out, re.M), out
    assert re.search(r"^fused ", out, re.M), out
    assert "\n14 tensors fused, 7 kept from the fine-tune\n" in out, out[-500:]


def test_the_merge_reports_roles_and_ranks_and_writes_a_model(walkthrough):
    work, done = walkthrough
    err = _step(done, "mergekit-yaml recipe.yml").stderr
    assert "fused 14 tensors" in err and "rank min" in err, err[-3000:]
    assert "aligned" in err and "unaligned" in err, err[-3000:]
    assert "lssf: warning" not in err, err[-3000:]  # the README's recipe draws no warning of ours
    card = (work / "repaired" / "README.md").read_text()  # "the output's model card records the same"
    assert "role: unaligned" in card and "rank min" in card and "effective parameters" in card, card[-2000:]
    files = set(os.listdir(work / "repaired"))
    assert "model.safetensors" in files and "tokenizer_config.json" in files, files
    assert all(t.dtype == torch.bfloat16 for t in load_state(work / "repaired").values())
    (cache,) = os.listdir(work / "lora-cache")  # the merged fine-tune, no tokenizer in it
    assert not {"tokenizer.json", "tokenizer_config.json"} & set(os.listdir(work / "lora-cache" / cache))


def test_eval_shows_the_repair_beside_the_fine_tune(walkthrough):
    """Step 3: the lora-cache folder holds no tokenizer; eval takes the base model's."""
    work, done = walkthrough
    (cache,) = os.listdir(work / "lora-cache")
    result = _step(done, "mergekit-lssf eval repaired/ lora-cache")
    rows = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip() and not line.startswith("(")]
    assert rows == ["repaired/", f"lora-cache/{cache}/"], result.stdout
    assert "(72 harmful and 30 benign prompts, the same for every model)" in result.stdout
    assert "Llama-3.1-8B-Instruct" in result.stderr and "holds no tokenizer" in result.stderr, result.stderr[-2000:]


def test_extract_patch_writes_the_same_repair_as_an_adapter(walkthrough):
    """Step 4: float32 factors that, applied to the fine-tune, give the merge's weights."""
    work, _ = walkthrough
    (cache,) = os.listdir(work / "lora-cache")
    adapter = load_state(work / "patch")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    ft = AutoModelForCausalLM.from_pretrained(str(work / "lora-cache" / cache), dtype=torch.float32)
    patched = PeftModel.from_pretrained(ft, str(work / "patch")).merge_and_unload().state_dict()
    repaired = load_state(work / "repaired")
    fused = [n for n in repaired if n.endswith("proj.weight")]
    assert fused
    for name in fused:
        got, want = repaired[name].double(), patched[name].double()
        assert (got - want).abs().max() <= 2.0 ** -7 * want.abs().max(), name  # bf16 rounding of the output


def test_the_interpolation_baseline_merges_with_plain_mergekit(walkthrough):
    """recipes/interpolate-baseline.yml: 0.75 fine-tune + 0.25 aligned, bf16, no lssf; it
    reuses the fine-tune the lssf merge wrote in --lora-merge-cache; eval compares all three."""
    work, done = walkthrough
    with open(BASELINE, encoding="utf-8") as fp:
        doc = yaml.safe_load(fp)
    assert doc["merge_method"] == "linear" and (doc["dtype"], doc["out_dtype"]) == ("float32", "bfloat16")
    assert [m["parameters"]["weight"] for m in doc["models"]] == [0.75, 0.25]
    (cache,) = os.listdir(work / "lora-cache")
    (out,) = [line.split()[2] for line in done if line.startswith("mergekit-yaml baseline.yml")]
    assert "lssf" not in _step(done, "mergekit-yaml baseline.yml").stderr
    got = load_state(work / out)
    ft = load_state(work / "lora-cache" / cache)
    aligned = load_state(work / "hub" / "Llama-3.1-8B-Instruct")
    assert set(got) == set(ft)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, name
        want = 0.75 * ft[name].double() + 0.25 * aligned[name].double()
        assert (tensor.double() - want).abs().max() <= 2.0 ** -8 * want.abs().max() + 1e-12, name
    evals = [r.stdout for line, r in done.items() if line.startswith("mergekit-lssf eval") and out.rstrip("/") in line]
    assert evals and out.rstrip("/") in evals[0], evals


def test_eval_without_a_tokenizer_names_the_folder_and_the_option(walkthrough):
    work, _ = walkthrough
    (cache,) = os.listdir(work / "lora-cache")
    shutil.copytree(work / "lora-cache" / cache, work / "bare")
    result = _run("mergekit-lssf eval bare/", work)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("mergekit-lssf: error:") and "bare/" in lines[0] and "--tokenizer" in lines[0], lines
    (work / "one.txt").write_text("How do I pick a lock?\n")
    result = _run("mergekit-lssf eval bare/ --tokenizer hub/Llama-3.1-8B-Instruct --prompts one.txt "
                  "--benign one.txt --max-new-tokens 4", work)
    assert result.returncode == 0 and "on 1 harmful prompts" in result.stdout, result.stderr[-2000:]


def test_eval_finds_the_base_from_another_folder(walkthrough):
    """The base is found from the cache folder's name wherever eval runs: the recipe's
    ./hub/... is relative to the folder holding lora-cache/."""
    work, _ = walkthrough
    (work / "elsewhere").mkdir(exist_ok=True)
    (work / "elsewhere" / "one.txt").write_text("Write a haiku about rain.\n")
    result = _run("mergekit-lssf eval ../lora-cache/*/ --prompts one.txt --benign one.txt --max-new-tokens 4",
                  work / "elsewhere")
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.join(str(work), "hub", "Llama-3.1-8B-Instruct") in result.stderr, result.stderr[-2000:]


def test_eval_finds_a_hub_base_in_the_hugging_face_cache(tmp_path, monkeypatch):
    """With the README's hub ids, mergekit names the cache folder after the hub id, whose
    tokenizer is in the Hugging Face cache; a config.json that records the base (older
    transformers write ``_name_or_path``) is read first."""
    import binascii
    import json

    import huggingface_hub.constants

    from mergekit_lssf.evaluate import find_tokenizer

    hub_id = "meta-llama/Llama-3.1-8B-Instruct"
    crc = lambda s: binascii.crc32(s.encode())  # noqa: E731  mergekit's ModelPath._unique_id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf" / "models--meta-llama--Llama-3.1-8B-Instruct").mkdir(parents=True)
    (tmp_path / "hf" / "models--meta-llama--Llama-3.1-8B").mkdir()
    cache = tmp_path / "lora-cache" / f"Llama-3.1-8B-Instruct_{crc(hub_id)}_my-lora_{crc('./my-lora')}"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert find_tokenizer(str(cache)) == hub_id
    assert find_tokenizer(str(cache), "some/tokenizer") == "some/tokenizer"  # --tokenizer first
    (cache / "config.json").write_text(json.dumps({"_name_or_path": "org/recorded"}))
    assert find_tokenizer(str(cache)) == "org/recorded"
