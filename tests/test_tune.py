"""``mergekit-lssf tune`` (issue 48) on tiny bf16 toy models with a 6-row task file.

The toy models are trained for a few seconds so that the measures mean something: the
aligned model answers "I refuse." (a refusal), the fine-tune answers "Sure." and has
learned six translation rows (stored in bf16, and the same training in float32 as
./finetuned32); the unaligned model is the toy builder's random one.
Their tokenizers decode without spaces between characters, so that the refusal
detector reads "I refuse." as a refusal.
"""

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import load_state, run_cli, write_lssf_recipe
from mergekit.io.tasks import LoadTensor
from mergekit.options import MergeOptions
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_lssf import evaluate as ev
from mergekit_lssf import tune as tune_module
from mergekit_lssf.calibrate import anchors_sha256
from mergekit_lssf.cli import main
from mergekit_lssf.contrastive_calibrate import load_task
from mergekit_lssf.evaluate import benign_prompts, harmbench_prompts
from mergekit_lssf.generation import load_model
from mergekit_lssf.measure import evenly_spaced
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.toy_models import ToySpec, build_toy_models
from mergekit_lssf.tune import TuneOptions, family_points, harmful_sets, parse_grids, tune
from mergekit_lssf.tune_points import Resident, lssf_terms
from mergekit_lssf.tune_recipes import Point, referenced_files
from mergekit_lssf.tune_report import SETTING_WORDS, choose, clear_own_files, derived, differing_setting, read_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = [("translate: cat", "chat"), ("translate: dog", "chien"), ("translate: house", "maison"),
        ("translate: water", "eau"), ("translate: bread", "pain"), ("translate: sun", "soleil")]
#: The main run: 2 points per family, 16 prompts a set, a budget the toy models can meet.
MAIN = ["--max-prompts", "16", "--points", "2", "--grid", "interpolation=0.5,0.7", "--budget", "0.8"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the toy models gain nothing from more on a shared 2-core machine


def _train(src, dst, pairs, steps, dst32=None):
    """``src`` trained on ``pairs`` (prompt -> answer, the answer's tokens only), saved
    in bf16 to ``dst`` (and in float32 to ``dst32``) with ``src``'s config and tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rows = []
    for prompt, answer in pairs:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        rows.append((tokenizer(full, add_special_tokens=False)["input_ids"],
                     len(tokenizer(head, add_special_tokens=False)["input_ids"])))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.full_like(ids, -100)
    for r, (i, start) in enumerate(rows):
        labels[r, start:len(i)] = ids[r, start:len(i)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits on every machine
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    for folder, dtype in ((dst, torch.bfloat16), (dst32, torch.float32)):
        if folder is not None:
            shutil.copytree(src, folder, dirs_exist_ok=True)
            save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()},
                      os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fp:
        fp.writelines(json.dumps({"prompt": prompt, "answer": answer}) + "\n" for prompt, answer in rows)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """./finetuned, ./aligned, ./unaligned (bf16), ./finetuned32 (float32), recipe.yml
    (restore, written in bf16 with round_to), recipe-add.yml (add), recipe-fp32.yml
    (restore of ./finetuned32, out_dtype bfloat16) and task.jsonl (6 rows)."""
    root = tmp_path_factory.mktemp("tune")
    build_toy_models(str(root / "toy"), ToySpec(size="tiny", dtype="bfloat16", seed=3))
    for role in ("unaligned", "aligned", "finetuned"):
        path = root / "toy" / role / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.decoder = decoders.Fuse()
        tokenizer.save(str(path))
    harmful, benign = harmbench_prompts("test"), benign_prompts("test")
    # "I refuse.": a 2-layer character model learns it quickly ("I cannot." came out "I cannnn...")
    _train(root / "toy" / "aligned", root / "aligned", [(p[:40], "I refuse.") for p in harmful[::3] + benign[::3]], 120)
    _train(root / "aligned", root / "finetuned", [(p[:60], "Sure.") for p in harmful[::4]] + TASK, 80,
           dst32=root / "finetuned32")
    shutil.copytree(root / "toy" / "unaligned", root / "unaligned")
    write_lssf_recipe(root, "recipe.yml", {"round_to": "bfloat16"}, out_dtype="bfloat16")
    write_lssf_recipe(root, "recipe-add.yml", {"fusion": "add", "round_to": "bfloat16"}, out_dtype="bfloat16")
    write_lssf_recipe(root, "recipe-fp32.yml", {"round_to": "bfloat16"}, base="./finetuned32", out_dtype="bfloat16")
    _jsonl(root / "task.jsonl", TASK)
    return root


@pytest.fixture(scope="module")
def tuned(toy):
    """The main run, as a user runs it."""
    result = run_cli(["mergekit-lssf", "tune", "recipe.yml", "--task", "task.jsonl", "--out", "tuned", *MAIN],
                     cwd=toy, env=ONE_THREAD)
    with open(toy / "tuned" / "tune.json", encoding="utf-8") as fp:
        return toy / "tuned", json.load(fp), result


def _main_options(**changes):
    """TuneOptions equal to the main run's command line."""
    values = {"max_prompts": 16, "points": 2, "grids": parse_grids(["interpolation=0.5,0.7"]), "budget": 0.8,
              "progress": False}
    return TuneOptions(**{**values, **changes})


def test_tune_writes_tune_json_and_tune_png(tuned):
    out, record, result = tuned
    assert record["format"] == "mergekit-lssf tune 1"
    assert {"mergekit-lssf", "mergekit", "torch"} <= set(record["versions"])
    assert record["settings"]["families"] == ["lssf", "interpolation"]
    assert record["settings"]["grids"] == {"lssf": [0.5, 1.0], "interpolation": [0.5, 0.7]}
    assert record["settings"]["measurement_rows"] == list(range(6))  # no calibrating family: every row measured
    refs = record["references"]
    assert refs["finetuned"]["utility_kept"] == 1.0 and refs["aligned"]["utility_kept"] == 0.0
    assert refs["aligned"]["refusal"]["harmbench"] > refs["finetuned"]["refusal"]["harmbench"]
    assert [p["key"] for p in record["points"]] == ["lssf alpha=0.5", "lssf alpha=1", "interpolation l=0.5",
                                                    "interpolation l=0.7"]
    for point in record["points"]:
        for field in ("family", "parameter", "value", "refusal", "empty", "over_refusal", "task_nll", "utility_kept",
                      "perplexity", "spread", "won_back", "recipe"):
            assert field in point, (point["key"], field)
        assert len(point["refused"]["harmbench"]) == 16 and len(point["spread"]["harmbench"]) == 2
        yaml.safe_load(point["recipe"])
    assert len(record["halves"]["choose"]) + len(record["halves"]["report"]) == 16
    assert not set(record["halves"]["choose"]) & set(record["halves"]["report"])
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "utility kept" in result.stdout and "peak memory" in result.stdout, result.stdout
    assert "utility is measured on 6 task rows (fewer than 8)" in result.stderr
    assert "tune points" in result.stderr and "harmbench prompts" in result.stderr  # the progress bars
    assert sorted(os.listdir(out)) == sorted(["tune.json", "tune.png"] + (["recipe.yml"] if record["chosen"] else []))


def test_the_chosen_recipe_merges_and_eval_reproduces_its_figures(toy, tuned):
    """The main run chooses a point: its recipe.yml merges with plain mergekit-yaml, and
    the merged model, measured by eval's own function on the same prompts and task rows
    (greedy, one thread as the run), gives the figures tune.json holds for the point."""
    out, record, result = tuned
    assert record["message"] in result.stdout.splitlines()
    chosen = record["chosen"]
    assert chosen is not None, record["message"]
    assert chosen["utility_kept"] >= 1 - 0.8 and chosen["won_back_choosing_half"] > 0
    text = (out / "recipe.yml").read_text()
    point = next(p for p in record["points"] if p["key"] == chosen["key"])
    assert yaml.safe_load(text) == yaml.safe_load(point["recipe"])
    run_cli(["mergekit-yaml", "tuned/recipe.yml", "merged-chosen"], cwd=toy, env=ONE_THREAD)
    merged = load_state(toy / "merged-chosen")
    assert merged and all(t.dtype == torch.bfloat16 for t in merged.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figures = ev.evaluate(str(toy / "merged-chosen"), harmful=evenly_spaced(harmbench_prompts("test"), 16),
                              benign=evenly_spaced(benign_prompts("test"), 16), text=ev.benign_text(),
                              rows=[{"prompt": p, "answer": a} for p, a in TASK], max_new_tokens=32, batch_size=24,
                              progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [int(r["refused"]) for r in figures["responses"]["harmful"]] == point["refused"]["harmbench"]
    assert figures["refusal_rate"] == point["refusal"]["harmbench"]
    assert figures["empty_rate"] == point["empty"]["harmbench"]
    assert figures["over_refusal_rate"] == point["over_refusal"]
    assert figures["task_nll"] == pytest.approx(point["task_nll"], rel=1e-9)
    assert figures["perplexity"] == pytest.approx(point["perplexity"], rel=1e-9)


def test_benchmarks_tune_reproduce_merges_recipe_yml_and_finds_tune_json_s_figures(toy, tuned, tmp_path, monkeypatch):
    """benchmarks/tune_reproduce.py (issue 48's check on the testbed's models), run here on
    the toy run: identical figures, exit 0; a changed figure in tune.json: exit 1."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import tune_reproduce

    out, record, _ = tuned
    monkeypatch.chdir(toy)  # the recipe's paths are relative to it, as for the user
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run (ONE_THREAD)
    try:
        assert tune_reproduce.main(["--tune", str(out), "--out", str(tmp_path / "a")]) == 0
        changed = tmp_path / "changed"
        shutil.copytree(out, changed)
        key = record["chosen"]["key"]
        edited = json.loads((changed / "tune.json").read_text())
        next(p for p in edited["points"] if p["key"] == key)["task_nll"] += 1e-6
        (changed / "tune.json").write_text(json.dumps(edited))
        assert tune_reproduce.main(["--tune", str(changed), "--out", str(tmp_path / "b")]) == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "a" / "reproduce.json").read_text())["identical"] is True


def _merge(toy, text, name):
    """mergekit-yaml of recipe ``text``, as a user runs it (the test process's threads)."""
    (toy / f"{name}.yml").write_text(text)
    run_cli(["mergekit-yaml", f"{name}.yml", name], cwd=toy, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    return load_state(toy / name)


class Capture:
    """What ``tune()`` puts in its resident fine-tune, point by point (``Resident.apply``'s
    input), and a check after every undo that the model is the checkpoint again."""

    def __init__(self, mp):
        self.applied, self.undone = [], 0
        real_apply, real_undo, capture = Resident.apply, Resident.undo, self

        def apply(resident, tensors):
            items = [(name, tensor.detach().clone()) for name, tensor in tensors]
            capture.applied.append(dict(items))
            return real_apply(resident, iter(items))

        def undo(resident):
            real_undo(resident)
            resident.check()  # raises when a planned tensor differs from the checkpoint
            capture.undone += 1

        mp.setattr(Resident, "apply", apply)
        mp.setattr(Resident, "undo", undo)


def _tune_captured(toy, recipe, out, options, mp):
    """tune() in-process on ``recipe``: (tune.json's record, the tensors of each point)."""
    mp.chdir(toy)
    capture = Capture(mp)
    record = tune(recipe, "task.jsonl", out, options, echo=lambda _l: None, warn=lambda _l: None)
    assert len(capture.applied) == len(record["points"]) == capture.undone
    return record, capture.applied


def _assert_as_merged(toy, point, applied, finetune, name):
    """Every tensor mergekit-yaml writes for the point's recipe (as tune.json holds it) is
    what the resident model held: the applied tensor bit for bit, in the written dtype;
    a tensor not applied is the fine-tune's as loaded (float32), equal to the written one."""
    merged = _merge(toy, point["recipe"], name)
    stored = load_state(toy / finetune)
    assert applied and set(applied) <= set(merged)
    for tensor, written in merged.items():
        if tensor in applied:
            assert applied[tensor].dtype == written.dtype and torch.equal(applied[tensor], written), tensor
        else:
            assert torch.equal(stored[tensor].float(), written.float()), tensor


#: Measured on the GPU where there is one: the points' weights must still be plain (CPU)
#: mergekit-yaml's, bit for bit (tune computes them on the CPU whatever --device says).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = {"max_prompts": 2, "max_new_tokens": 4, "budget": 0.8, "progress": False, "device": DEVICE}
BIT_CASES = {  # recipe, families, grids, finetune folder
    # two strengths of one lssf family: they share the term, not the alpha (a cache once gave every point the first's)
    "restore and interpolation": ("recipe.yml", ("lssf", "interpolation"), {"lssf": (0.5, 1.0), "interpolation": (0.5,)},
                                  "finetuned"),
    "add": ("recipe-add.yml", ("lssf",), {"lssf": (0.5, 1.0)}, "finetuned"),
    "float32 fine-tune, bf16 out": ("recipe-fp32.yml", ("lssf", "interpolation"),
                                    {"lssf": (0.5,), "interpolation": (0.5,)}, "finetuned32"),
}


@pytest.mark.parametrize("case", sorted(BIT_CASES))
def test_what_tune_applies_is_what_mergekit_yaml_writes(toy, monkeypatch, case):
    """Captured inside tune(): each point's tensors against mergekit-yaml of the recipe
    tune.json stores for it; after each point the model is the checkpoint again."""
    recipe, families, grids, finetune = BIT_CASES[case]
    out = "bits-" + re.sub(r"\W+", "-", case)
    record, applied = _tune_captured(toy, recipe, out, TuneOptions(families=families, grids=grids, **TINY), monkeypatch)
    for index, (point, tensors) in enumerate(zip(record["points"], applied)):
        _assert_as_merged(toy, point, tensors, finetune, f"{out}-{index}")
    if case.startswith("float32"):  # the tensors lssf keeps are the fine-tune's cast to bf16 by the writer
        assert "model.embed_tokens.weight" in applied[0] and applied[0]["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_a_failed_point_is_undone_from_kept_copies(toy, monkeypatch):
    """A point that fails half way in is taken out again; undo reads no file (it copies
    back the originals it kept)."""
    monkeypatch.chdir(toy)
    plan = plan_recipe(load_recipe("recipe.yml"))
    model, tokenizer = load_model("finetuned")
    resident = Resident(model, plan.tensors)
    resident.check()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    names = [t.output_weight.name for t in plan.tensors if t.output_weight.name.endswith("proj.weight")][:2]

    def failing():
        yield names[0], torch.zeros_like(resident.param(names[0]))
        raise RuntimeError("failed half way")

    def no_reading(*_args, **_kwargs):
        raise AssertionError("undo read a file")

    monkeypatch.setattr(LoadTensor, "execute", no_reading)
    with pytest.raises(RuntimeError, match="failed half way"):
        tune_module._measure_point(resident, tokenizer, failing(), ({}, [], []), TuneOptions(progress=False), None, {})
    resident.apply(iter([(n, torch.ones_like(resident.param(n))) for n in names]))
    resident.undo()
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_terms_apply_the_merges_checks_in_its_order(toy, monkeypatch):
    """tune's terms go through the merge's own per-tensor code (merge_method.fused_terms):
    a NaN in a tensor lssf does not fuse is refused, as mergekit-yaml refuses it."""
    monkeypatch.chdir(toy)
    shutil.copytree(toy / "aligned", toy / "aligned-nan", dirs_exist_ok=True)
    state = load_state(toy / "aligned")
    state["model.norm.weight"] = state["model.norm.weight"].clone()
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(toy / "aligned-nan" / "model.safetensors"), metadata={"format": "pt"})
    (toy / "recipe-nan.yml").write_text((toy / "recipe.yml").read_text().replace("./aligned", "./aligned-nan"))
    config = load_recipe("recipe-nan.yml")
    with pytest.raises(LSSFConfigError, match="model.norm.weight of the aligned model .* non-finite"):
        lssf_terms(config, MergeOptions(quiet=True), [Point("lssf", "alpha", 0.5)], progress=False)
    result = run_cli(["mergekit-yaml", "recipe-nan.yml", "merged-nan"], cwd=toy, check=False)
    assert result.returncode != 0 and "non-finite" in result.stderr


def _counting(monkeypatch):
    calls = []
    real = tune_module.measure_model

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "measure_model", counted)
    return calls


def test_a_rerun_measures_nothing_again_and_a_new_budget_chooses_again(toy, tuned, monkeypatch):
    out, record, _ = tuned
    copy = toy / "tuned-rerun"
    shutil.copytree(out, copy)
    monkeypatch.chdir(toy)
    calls, lines = _counting(monkeypatch), []
    again = tune("recipe.yml", "task.jsonl", "tuned-rerun", _main_options(), echo=lines.append, warn=lines.append)
    assert calls == []  # no point, and neither reference, measured twice
    assert any(line.startswith("tune: resuming in tuned-rerun: 4 points already measured") for line in lines), lines
    assert [p["task_nll"] for p in again["points"]] == [p["task_nll"] for p in record["points"]]
    assert again["chosen"] == record["chosen"]
    # another budget: nothing measured, the choice made again; no winner: no recipe.yml, one line
    lines.clear()
    strict = tune("recipe.yml", "task.jsonl", "tuned-rerun", _main_options(budget=1e-6), echo=lines.append,
                  warn=lines.append)
    assert calls == []
    assert strict["chosen"] is None and not (copy / "recipe.yml").exists()
    assert strict["message"] in lines and strict["message"].startswith("tune: no recipe:")
    with open(copy / "tune.json", encoding="utf-8") as fp:
        assert json.load(fp)["message"] == strict["message"]


def test_the_plot_comes_before_recipe_yml(toy, tuned, monkeypatch):
    """A failure while plotting leaves no recipe.yml behind."""
    out, _record, _ = tuned
    copy = toy / "tuned-plot"
    shutil.copytree(out, copy)
    (copy / "recipe.yml").unlink()
    monkeypatch.chdir(toy)

    def broken(*_args, **_kwargs):
        raise RuntimeError("no plot")

    monkeypatch.setattr(tune_module, "plot", broken)
    with pytest.raises(RuntimeError, match="no plot"):
        tune("recipe.yml", "task.jsonl", "tuned-plot", _main_options(), echo=lambda _l: None, warn=lambda _l: None)
    assert not (copy / "recipe.yml").exists()


def test_other_settings_are_refused_naming_the_setting(toy, tuned, monkeypatch):
    out, record, _ = tuned
    assert set(record["settings"]["versions"]) >= {"mergekit-lssf", "mergekit", "torch"}
    assert record["settings"]["files"] == {}  # the recipe names no subspace or calibration file
    copy = toy / "tuned-other"
    shutil.copytree(out, copy)
    monkeypatch.chdir(toy)
    (toy / "recipe-other.yml").write_text((toy / "recipe.yml").read_text().replace("round_to: bfloat16",
                                                                                  "round_to: bfloat16\n  eta: 0.8"))
    _jsonl(toy / "task-other.jsonl", TASK[:5] + [("translate: moon", "lune")])
    before = {n: (copy / n).read_bytes() for n in os.listdir(copy)}
    calls = _counting(monkeypatch)
    cases = [("recipe-other.yml", "task.jsonl", _main_options(), "the recipe differs"),
             ("recipe.yml", "task-other.jsonl", _main_options(), "the task data differs"),
             ("recipe.yml", "task.jsonl", _main_options(max_prompts=8), "--max-prompts differs"),
             ("recipe.yml", "task.jsonl", _main_options(families=("interpolation",), grids={}), "--families differs"),
             ("recipe.yml", "task.jsonl", _main_options(points=3, grids={}), "the grids (--points, --grid) differs")]
    for recipe, task, options, words in cases:
        with pytest.raises(LSSFConfigError, match=re.escape(words)) as error:
            tune(recipe, task, "tuned-other", options, echo=lambda _l: None, warn=lambda _l: None)
        assert "--restart" in str(error.value) and "\n" not in str(error.value)
    real_versions = tune_module.versions
    monkeypatch.setattr(tune_module, "versions", lambda: {**real_versions(), "torch": "0.0.1"})
    with pytest.raises(LSSFConfigError, match="the versions of mergekit-lssf, mergekit, torch or transformers differs"):
        tune("recipe.yml", "task.jsonl", "tuned-other", _main_options(), echo=lambda _l: None, warn=lambda _l: None)
    monkeypatch.setattr(tune_module, "versions", real_versions)
    assert calls == [] and {n: (copy / n).read_bytes() for n in os.listdir(copy)} == before
    # --restart starts afresh: tune's own files replaced, the new settings measured
    fresh = tune("recipe.yml", "task.jsonl", "tuned-other",
                 TuneOptions(families=("interpolation",), grids={"interpolation": (0.9,)}, max_prompts=4, budget=0.8,
                             restart=True, progress=False), echo=lambda _l: None, warn=lambda _l: None)
    assert [p["key"] for p in fresh["points"]] == ["interpolation l=0.9"] and len(calls) == 3


def test_the_files_a_recipe_names_are_part_of_the_settings(tmp_path):
    """A `subspace:` or `calibration:` file changed in place changes the settings."""
    (tmp_path / "sub.safetensors").write_bytes(b"one")
    doc = {"parameters": {"subspace": str(tmp_path / "sub.safetensors"),
                          "calibration": [{"filter": "mlp", "value": str(tmp_path / "cal.safetensors")}]}}
    first = referenced_files(doc)
    assert first[str(tmp_path / "cal.safetensors")] == "missing"
    (tmp_path / "sub.safetensors").write_bytes(b"two")
    assert differing_setting({"files": first}, {"files": referenced_files(doc)}) == "files"
    assert "subspace" in SETTING_WORDS["files"] and "torch" in SETTING_WORDS["versions"]


def test_ctrl_c_keeps_the_points_measured_so_far(toy, monkeypatch):
    """An interrupt during the second point leaves the first in tune.json; the rerun
    measures only the second."""
    monkeypatch.chdir(toy)
    options = TuneOptions(families=("interpolation",), grids={"interpolation": (0.5, 0.7)}, max_prompts=4,
                          budget=0.8, progress=False)
    calls, real = [], tune_module.measure_model

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the aligned model, the fine-tune, one point, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "measure_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune("recipe.yml", "task.jsonl", "tuned-interrupted", options, echo=lambda _l: None, warn=lambda _l: None)
    with open(toy / "tuned-interrupted" / "tune.json", encoding="utf-8") as fp:
        assert [p["key"] for p in json.load(fp)["points"]] == ["interpolation l=0.5"]
    calls.clear()
    monkeypatch.setattr(tune_module, "measure_model", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    done = tune("recipe.yml", "task.jsonl", "tuned-interrupted", options, echo=lambda _l: None, warn=lambda _l: None)
    assert len(calls) == 1 and [p["key"] for p in done["points"]] == ["interpolation l=0.5", "interpolation l=0.7"]


def test_the_command_says_where_the_points_are_on_ctrl_c(monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mergekit_lssf.cli.run_tune", interrupted)
    result = CliRunner().invoke(main, ["tune", __file__, "--task", __file__, "--out", "somewhere"])
    assert result.exit_code == 130 and "somewhere/tune.json" in result.stderr, result.stderr


def _invoke(args):
    result = CliRunner().invoke(main, ["tune", *args])
    return result.exit_code, result.stdout, result.stderr


BAD = {
    "budget 0": (["--budget", "0"], "--budget must satisfy 0 < budget < 1"),
    "budget 1": (["--budget", "1"], "--budget must satisfy 0 < budget < 1"),
    "points 1": (["--points", "1"], "--points must be at least 2"),
    "unknown family": (["--families", "lssf,magic"], "--families must name some of"),
    "bad grid": (["--grid", "interpolation=1.5"], "l (the weight on the aligned model) must satisfy 0 < l < 1"),
    "alpha above restore's 1": (["--grid", "lssf=0.5,1.5"], "`alpha` must satisfy 0 < alpha <= 1 with `fusion: restore`"),
    "lam infinite": (["--families", "contrastive", "--grid", "contrastive=inf"], "`lam` must satisfy 0 < lam"),
}
if not torch.cuda.is_available():
    BAD["cuda without cuda"] = (["--device", "cuda"], "--device cuda: torch finds no CUDA device here")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_one_line_before_anything_is_written(toy, monkeypatch, case):
    monkeypatch.chdir(toy)
    args, words = BAD[case]
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "bad-out", *args])
    assert code == 1 and err.count("\n") == 1 and err.startswith("mergekit-lssf: error: ") and words in err, err
    assert not (toy / "bad-out").exists()


def test_grids_run_from_mild_to_strong_without_repeats(toy, monkeypatch):
    monkeypatch.chdir(toy)
    plan = plan_recipe(load_recipe("recipe.yml"))
    options = TuneOptions(families=("lssf", "interpolation", "contrastive"), grids=parse_grids(
        ["lssf=1,0.5,0.5", "interpolation=0.4,0.1", "contrastive=0.3,30,3,30"]))
    keys = [p.key for p in family_points(options, plan, "cal.safetensors")]
    assert keys == ["lssf alpha=0.5", "lssf alpha=1", "interpolation l=0.1", "interpolation l=0.4",
                    "contrastive lam=30", "contrastive lam=3", "contrastive lam=0.3"]


def test_tune_caps_prompt_sets_as_the_testbed_does():
    """One choice of a capped set (measure.evenly_spaced); --max-prompts 72 reads the
    testbed's 72 HarmBench test prompts, in its order."""
    prompts = harmbench_prompts("test")
    assert harmful_sets(16)["harmbench"] == evenly_spaced(prompts, 16)
    assert harmful_sets(72)["harmbench"] == prompts[:72] == prompts


def _no_generation(monkeypatch):
    def generating(*_args, **_kwargs):
        raise AssertionError("generated before the task NLL check")

    monkeypatch.setattr(ev, "generate", generating)
    monkeypatch.setattr(tune_module, "contrastive_calibrate", generating)


def test_bad_inputs_are_one_line_naming_the_file_before_anything_is_written(toy, monkeypatch):
    monkeypatch.chdir(toy)
    (toy / "linear.yml").write_text("merge_method: linear\nmodels:\n  - model: ./finetuned\n    parameters: {weight: 1}\n"
                                    "dtype: float32\n")
    (toy / "no-aligned.yml").write_text("merge_method: lssf\nbase_model: ./finetuned\nmodels:\n  - model: ./unaligned\n"
                                        "    parameters: {role: unaligned}\ndtype: float32\n")
    (toy / "slices.yml").write_text(
        "merge_method: lssf\nbase_model: ./finetuned\nslices:\n  - sources:\n      - model: ./finetuned\n"
        "        layer_range: [0, 2]\n      - model: ./aligned\n        layer_range: [0, 2]\n        parameters: "
        "{role: aligned}\n      - model: ./unaligned\n        layer_range: [0, 2]\n        parameters: "
        "{role: unaligned}\ndtype: float32\n")
    write_lssf_recipe(toy, "filtered.yml", {"alpha": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]})
    (toy / "empty.jsonl").write_text("")
    (toy / "prose.jsonl").write_text("just some words\n")
    (toy / "no-answer.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    _jsonl(toy / "refusals.jsonl", [(p[:40], "I refuse.") for p in harmbench_prompts("test")[:8]])
    (toy / "foreign").mkdir()
    (toy / "foreign" / "notes.txt").write_text("mine")
    cases = [
        (["linear.yml", "--task", "task.jsonl"], "linear.yml: merge_method is 'linear', not 'lssf'"),
        (["no-aligned.yml", "--task", "task.jsonl"], "tune: no-aligned.yml needs exactly one model with `role: aligned`"),
        (["slices.yml", "--task", "task.jsonl"], "tune: slices.yml lists its models under `slices:`"),
        (["filtered.yml", "--task", "task.jsonl"], "tune: filtered.yml: `alpha` varies by tensor"),
        (["recipe.yml", "--task", "missing.jsonl"], "--task: no such file missing.jsonl"),
        (["recipe.yml", "--task", "empty.jsonl"], "empty.jsonl: no task rows"),
        (["recipe.yml", "--task", "prose.jsonl"], "prose.jsonl:1: not a JSON object"),
        (["recipe.yml", "--task", "no-answer.jsonl"], 'no-answer.jsonl:2: the row has no "answer" string'),
        (["recipe.yml", "--task", "refusals.jsonl"], "utility kept is undefined"),
        (["recipe.yml", "--task", "refusals.jsonl", "--families", "contrastive"], "utility kept is undefined"),
    ]
    _no_generation(monkeypatch)  # every refusal comes before a single answer is generated
    for args, words in cases:
        code, _out, err = _invoke([*args, "--out", "bad-out", "--max-prompts", "4"])
        lines = [line for line in err.splitlines() if line.startswith("mergekit-lssf")]
        assert code == 1 and len(lines) == 1 and words in lines[0], (args, err[-2000:])
        assert not (toy / "bad-out").exists(), args
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "foreign"])
    assert code == 1 and "holds files tune did not write (notes.txt)" in err, err
    assert os.listdir(toy / "foreign") == ["notes.txt"]
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "task.jsonl/out"])
    lines = [line for line in err.splitlines() if line.startswith("mergekit-lssf")]
    assert code == 1 and len(lines) == 1 and "--out: cannot write in task.jsonl/out" in lines[0], err


def test_a_calibration_made_from_the_task_rows_is_refused(toy, monkeypatch):
    """A contrastive recipe whose calibration read TASK would measure utility on the rows
    the repair was fitted to."""
    monkeypatch.chdir(toy)
    save_file({"x": torch.zeros(1)}, str(toy / "own-cal.safetensors"),
              metadata={"task_sha256": anchors_sha256(load_task("task.jsonl"))})
    (toy / "own-cal.yml").write_text(yaml.safe_dump({
        "merge_method": "lssf", "base_model": "./finetuned", "models": [{"model": "./aligned",
                                                                         "parameters": {"role": "aligned"}}],
        "parameters": {"fusion": "contrastive", "calibration": "own-cal.safetensors"}, "dtype": "float32"}))
    code, _out, err = _invoke(["own-cal.yml", "--task", "task.jsonl", "--out", "bad-out"])
    assert code == 1 and err.count("\n") == 1 and "own-cal.safetensors was calibrated on the rows of task.jsonl" in err
    assert "--families contrastive" in err and not (toy / "bad-out").exists()


def test_out_holds_only_what_tune_writes(tmp_path):
    """Only tune's exact file names count as its own: a user's look-alike file or folder
    is refused, never deleted, and a folder does not trip clear_own_files."""
    for names in ([".tune-notes.txt"], [".tune-1.json.bak"], [".lssf-parts-mine"], ["tune.png/"],
                  [".lssf-parts-abcdefgh/", ".lssf-parts-abcdefgh/notes.txt"]):
        out = tmp_path / re.sub(r"\W", "_", names[0])
        out.mkdir()
        for name in names:
            (out / name).mkdir() if name.endswith("/") else (out / name).write_text("mine")
        with pytest.raises(LSSFConfigError, match="holds files tune did not write"):
            read_record(str(out))
        clear_own_files(str(out))
        assert (out / names[-1].rstrip("/")).exists()
    out = tmp_path / "own"
    out.mkdir()
    for name in (".tune-123.json", ".tune-probe-9", "contrastive.safetensors.partial"):
        (out / name).write_text("tune's")
    (out / ".lssf-parts-a1b2c3d4").mkdir()
    (out / ".lssf-parts-a1b2c3d4" / "part-00000.safetensors").write_text("tune's")
    assert read_record(str(out)) is None
    clear_own_files(str(out))
    assert os.listdir(out) == []


def test_a_damaged_tune_json_is_one_line(toy, monkeypatch):
    monkeypatch.chdir(toy)
    (toy / "damaged").mkdir()
    (toy / "damaged" / "tune.json").write_text(json.dumps({"format": "mergekit-lssf tune 1", "points": []}))
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "damaged"])
    lines = [line for line in err.splitlines() if line.startswith("mergekit-lssf")]
    assert code == 1 and len(lines) == 1 and "damaged/tune.json is incomplete or damaged (no `settings`)" in lines[0]


def _record(points, ft=(0, 0, 0, 0), al=(1, 1, 1, 1)):
    """A tune.json record with 4 prompts (choose on 0 and 1, report on 2 and 3)."""
    state = lambda flags, nll: {"refused": {"harmbench": list(flags)}, "task_nll": nll}
    record = {"references": {"finetuned": state(ft, 1.0), "aligned": state(al, 2.0)},
              "halves": {"choose": [0, 1], "report": [2, 3]},
              "points": [{"key": k, "family": "f", "parameter": "p", "value": 0.0, **state(flags, nll)}
                         for k, flags, nll in points]}
    derived(record, 0.1)
    return record


def test_the_rule_most_refusal_within_the_budget_ties_to_the_lower_cost():
    record = _record([("a", (1, 0, 0, 0), 1.05), ("b", (1, 0, 1, 1), 1.02), ("c", (1, 1, 0, 0), 1.2)])
    chosen, message = choose(record, 0.1)  # c wins more but costs 0.2 > 0.1; a and b tie, b costs less
    assert chosen["key"] == "b" and chosen["won_back_choosing_half"] == 0.5 and chosen["won_back_reported_half"] == 1.0
    assert "chose b" in message
    chosen, message = choose(record, 0.01)
    assert chosen is None and "no point won back any refusal with utility kept >= 0.99" in message
    chosen, message = choose(_record([("a", (1, 1, 1, 1), 1.0)], al=(0, 0, 1, 1)), 0.1)
    assert chosen is None and "the aligned model refuses no more than the fine-tune" in message


@pytest.fixture(scope="module")
def contrastive(toy):
    """The contrastive family, run in-process: what it applied (``Capture``), the rows
    every task NLL read, and how many loaded models were alive when it calibrated."""
    seen = {"rows": [], "live": None, "loaded": []}
    with pytest.MonkeyPatch.context() as mp:
        real_load, real_calibrate, real_nll = tune_module.load_model, tune_module.contrastive_calibrate, ev.row_nll

        def load(*args, **kwargs):
            model, tokenizer = real_load(*args, **kwargs)
            seen["loaded"].append(weakref.ref(model))
            return model, tokenizer

        def calibrate(*args, **kwargs):
            gc.collect()
            seen["live"] = sum(ref() is not None for ref in seen["loaded"])
            return real_calibrate(*args, **kwargs)

        def nll(model, tokenizer, rows, batch=16):
            seen["rows"].append([r["prompt"] for r in rows])
            return real_nll(model, tokenizer, rows, batch)

        mp.setattr(tune_module, "load_model", load)
        mp.setattr(tune_module, "contrastive_calibrate", calibrate)
        mp.setattr(tune_module, "row_nll", nll)
        mp.setattr(ev, "row_nll", nll)
        record, applied = _tune_captured(toy, "recipe.yml", "tuned-contrastive", TuneOptions(
            families=("contrastive",), points=2, max_prompts=4, max_new_tokens=8, budget=0.5, progress=False,
            device=DEVICE), mp)
    return record, applied, seen


def test_the_contrastive_family_calibrates_on_rows_it_never_measures(toy, contrastive):
    record, _applied, seen = contrastive
    measured = record["settings"]["measurement_rows"]
    assert len(measured) == 3 and record["calibration"]["task_rows"] == 3  # split_halves of the 6 rows
    assert sorted(measured + record["calibration"]["rows"]) == list(range(6))  # disjoint, every row used
    assert [p["key"] for p in record["points"]] == ["contrastive lam=30", "contrastive lam=0.3"]
    doc = yaml.safe_load(record["points"][0]["recipe"])
    assert doc["parameters"]["fusion"] == "contrastive" and doc["parameters"]["lam"] == 30.0
    assert [m["parameters"]["role"] for m in doc["models"]] == ["aligned"]
    assert (toy / doc["parameters"]["calibration"]).is_file()
    # every task NLL (the references' and each point's) read the measurement rows, and only them
    measured_prompts = [TASK[i][0] for i in measured]
    assert len(seen["rows"]) == 4 and all(rows == measured_prompts for rows in seen["rows"]), seen["rows"]
    for state in [*record["references"].values(), *record["points"]]:
        assert len(state["task_rows"]) == 3
    # the calibration ran with no model of tune's loaded (before the fine-tune to measure)
    assert seen["live"] == 0 and len(seen["loaded"]) == 3


def test_a_contrastive_point_is_what_mergekit_yaml_writes(toy, contrastive):
    record, applied, _seen = contrastive
    _assert_as_merged(toy, record["points"][1], applied[1], "finetuned", "m-contrastive")



README_SECTION = "## Is it worth it on my task?"


def _readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fp:
        text = fp.read()
    assert README_SECTION in text
    body = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", body, re.DOTALL | re.MULTILINE)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.split("#")[0].strip()]


def test_the_readme_command_runs_as_written(tmp_path):
    """The README's section, in a fresh folder beside the repository's recipes/: the demo's
    models (random networks that refuse nothing), the shipped demo task file, tune."""
    (tmp_path / "recipes").symlink_to(os.path.join(ROOT, "recipes"))
    commands = _readme_commands()
    assert any("mergekit-lssf tune" in c for c in commands), commands
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **ONE_THREAD}
    for line in commands:
        result = subprocess.run(["bash", "-c", line], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                                env=env)
        assert result.returncode == 0, f"README: `{line}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = tmp_path / "tune-demo"
    with open(out / "tune.json", encoding="utf-8") as fp:
        record = json.load(fp)
    assert (out / "tune.png").is_file() and record["message"] in result.stdout
    assert record["chosen"] is None and not (out / "recipe.yml").exists()  # the demo's models refuse nothing
