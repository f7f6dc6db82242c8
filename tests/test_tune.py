"""``mergekit-lssf tune`` (issue 48) on tiny bf16 toy models with a 6-row task file.

The toy models are trained for a few seconds so that the measures mean something: the
aligned model answers "I refuse." (a refusal), the fine-tune answers "Sure." and has
learned six translation rows; the unaligned model is the toy builder's random one.
Their tokenizers decode without spaces between characters, so that the refusal
detector reads "I refuse." as a refusal.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import load_state, run_cli, write_lssf_recipe
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_lssf import tune as tune_module
from mergekit_lssf.cli import main
from mergekit_lssf.evaluate import benign_prompts, harmbench_prompts
from mergekit_lssf.generation import load_model
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.toy_models import ToySpec, build_toy_models
from mergekit_lssf.tune import TuneOptions, parse_grids, tune
from mergekit_lssf.tune_points import (
    Point,
    Resident,
    interpolation_tensors,
    lssf_tensors,
    lssf_terms,
)
from mergekit_lssf.tune_report import choose, derived

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = [("translate: cat", "chat"), ("translate: dog", "chien"), ("translate: house", "maison"),
        ("translate: water", "eau"), ("translate: bread", "pain"), ("translate: sun", "soleil")]
#: The main run: 2 points per family, 16 prompts a set, a budget the toy models can meet.
MAIN = ["--max-prompts", "16", "--points", "2", "--grid", "interpolation=0.5,0.7", "--budget", "0.8"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the toy models gain nothing from more on a shared 2-core machine


def _train(src, dst, pairs, steps):
    """``src`` trained on ``pairs`` (prompt -> answer, the answer's tokens only), saved
    in bf16 to ``dst`` with ``src``'s config and tokenizer."""
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
    shutil.copytree(src, dst, dirs_exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fp:
        fp.writelines(json.dumps({"prompt": prompt, "answer": answer}) + "\n" for prompt, answer in rows)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """./finetuned, ./aligned, ./unaligned (bf16), recipe.yml (restore, written in bf16
    with round_to) and task.jsonl (6 rows)."""
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
    _train(root / "aligned", root / "finetuned", [(p[:60], "Sure.") for p in harmful[::4]] + TASK, 80)
    shutil.copytree(root / "toy" / "unaligned", root / "unaligned")
    write_lssf_recipe(root, "recipe.yml", {"round_to": "bfloat16"}, out_dtype="bfloat16")
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


def test_the_chosen_recipe_merges_with_plain_mergekit_yaml(toy, tuned):
    """Either a recipe.yml that mergekit-yaml merges as it is, or one line saying that
    no point won anything back (and no recipe.yml)."""
    out, record, result = tuned
    assert record["message"] in result.stdout.splitlines()
    if record["chosen"] is None:
        assert not (out / "recipe.yml").exists()
        assert record["message"].startswith("tune: no recipe:")
        return
    chosen = record["chosen"]
    assert chosen["utility_kept"] >= 1 - 0.8 and chosen["won_back_choosing_half"] > 0
    text = (out / "recipe.yml").read_text()
    point = next(p for p in record["points"] if p["key"] == chosen["key"])
    assert yaml.safe_load(text) == yaml.safe_load(point["recipe"])
    run_cli(["mergekit-yaml", "tuned/recipe.yml", "merged-chosen"], cwd=toy, env=ONE_THREAD)
    merged = load_state(toy / "merged-chosen")
    assert merged and all(t.dtype == torch.bfloat16 for t in merged.values())


def _merge(toy, text, name):
    """mergekit-yaml of recipe ``text``, as a user runs it (the test process's threads)."""
    (toy / f"{name}.yml").write_text(text)
    run_cli(["mergekit-yaml", f"{name}.yml", name], cwd=toy, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    return load_state(toy / name)


def _check_point(resident, tensors, merged, original):
    """The resident model after the point holds mergekit-yaml's weights, every tensor,
    bit for bit; after undo, the fine-tune's again."""
    count = resident.apply(tensors)
    assert count > 0
    for name, written in merged.items():
        held = resident.param(name).detach()
        assert torch.equal(held, written.to(held.dtype)), name
    resident.undo()
    for name, value in resident.model.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_points_are_bit_identical_to_mergekit_yaml(toy, tuned, monkeypatch):
    """One lssf and one interpolation point, from the recipes tune.json holds, against
    mergekit-yaml runs of them; applied to one resident fine-tune and undone exactly."""
    _out, record, _ = tuned
    monkeypatch.chdir(toy)
    recipes = {p["key"]: p["recipe"] for p in record["points"]}
    plan = plan_recipe(load_recipe("recipe.yml"))
    model, _tokenizer = load_model("finetuned")
    resident = Resident(model, plan.tensors)
    resident.check()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    points = [Point("lssf", "alpha", 0.5), Point("lssf", "alpha", 1.0)]
    terms = lssf_terms(plan, points, cpu, progress=False)
    assert len(terms) == 14  # 7 linear weights per layer, 2 layers
    _check_point(resident, lssf_tensors(terms, 0, cpu), _merge(toy, recipes["lssf alpha=0.5"], "m-lssf"), original)
    doc = yaml.safe_load(recipes["interpolation l=0.5"])
    assert doc["merge_method"] == "linear"
    _check_point(resident, interpolation_tensors(doc, MergeOptions(quiet=True), cpu),
                 _merge(toy, recipes["interpolation l=0.5"], "m-interpolation"), original)


def _counting(monkeypatch):
    calls = []
    real = tune_module.measure_state

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "measure_state", counted)
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


def test_other_settings_are_refused_naming_the_setting(toy, tuned, monkeypatch):
    out, _record, _ = tuned
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
    assert calls == [] and {n: (copy / n).read_bytes() for n in os.listdir(copy)} == before
    # --restart starts afresh: tune's own files replaced, the new settings measured
    fresh = tune("recipe.yml", "task.jsonl", "tuned-other",
                 TuneOptions(families=("interpolation",), grids={"interpolation": (0.9,)}, max_prompts=4, budget=0.8,
                             restart=True, progress=False), echo=lambda _l: None, warn=lambda _l: None)
    assert [p["key"] for p in fresh["points"]] == ["interpolation l=0.9"] and len(calls) == 3


def test_ctrl_c_keeps_the_points_measured_so_far(toy, monkeypatch):
    """An interrupt during the second point leaves the first in tune.json; the rerun
    measures only the second."""
    monkeypatch.chdir(toy)
    options = TuneOptions(families=("interpolation",), grids={"interpolation": (0.5, 0.7)}, max_prompts=4,
                          budget=0.8, progress=False)
    calls, real = [], tune_module.measure_state

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the fine-tune, the aligned model, one point, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "measure_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune("recipe.yml", "task.jsonl", "tuned-interrupted", options, echo=lambda _l: None, warn=lambda _l: None)
    with open(toy / "tuned-interrupted" / "tune.json", encoding="utf-8") as fp:
        assert [p["key"] for p in json.load(fp)["points"]] == ["interpolation l=0.5"]
    calls.clear()
    monkeypatch.setattr(tune_module, "measure_state", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
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
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_one_line_before_anything_is_written(toy, monkeypatch, case):
    monkeypatch.chdir(toy)
    args, words = BAD[case]
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "bad-out", *args])
    assert code == 1 and err.count("\n") == 1 and err.startswith("mergekit-lssf: error: ") and words in err, err
    assert not (toy / "bad-out").exists()


def test_bad_inputs_are_one_line_naming_the_file_before_anything_is_written(toy, monkeypatch):
    monkeypatch.chdir(toy)
    (toy / "linear.yml").write_text("merge_method: linear\nmodels:\n  - model: ./finetuned\n    parameters: {weight: 1}\n"
                                    "dtype: float32\n")
    (toy / "no-aligned.yml").write_text("merge_method: lssf\nbase_model: ./finetuned\nmodels:\n  - model: ./unaligned\n"
                                        "    parameters: {role: unaligned}\ndtype: float32\n")
    (toy / "empty.jsonl").write_text("")
    (toy / "prose.jsonl").write_text("just some words\n")
    (toy / "no-answer.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    _jsonl(toy / "refusals.jsonl", [(p[:40], "I refuse.") for p in harmbench_prompts("test")[:8]])
    (toy / "foreign").mkdir()
    (toy / "foreign" / "notes.txt").write_text("mine")
    cases = [
        (["linear.yml", "--task", "task.jsonl"], "linear.yml: merge_method is 'linear', not 'lssf'"),
        (["no-aligned.yml", "--task", "task.jsonl"], "role: aligned"),
        (["recipe.yml", "--task", "missing.jsonl"], "--task: no such file missing.jsonl"),
        (["recipe.yml", "--task", "empty.jsonl"], "empty.jsonl: no task rows"),
        (["recipe.yml", "--task", "prose.jsonl"], "prose.jsonl:1: not a JSON object"),
        (["recipe.yml", "--task", "no-answer.jsonl"], 'no-answer.jsonl:2: the row has no "answer" string'),
        (["recipe.yml", "--task", "refusals.jsonl"], "utility kept is undefined"),
    ]
    for args, words in cases:
        code, _out, err = _invoke([*args, "--out", "bad-out", "--max-prompts", "4"])
        lines = [line for line in err.splitlines() if line.startswith("mergekit-lssf")]
        assert code == 1 and len(lines) == 1 and words in lines[0], (args, err[-2000:])
        assert not (toy / "bad-out").exists(), args
    code, _out, err = _invoke(["recipe.yml", "--task", "task.jsonl", "--out", "foreign"])
    assert code == 1 and "holds files tune did not write (notes.txt)" in err, err
    assert os.listdir(toy / "foreign") == ["notes.txt"]


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
    result = run_cli(["mergekit-lssf", "tune", "recipe.yml", "--task", "task.jsonl", "--out", "tuned-contrastive",
                      "--families", "contrastive", "--points", "2", "--max-prompts", "4", "--budget", "0.5"],
                     cwd=toy, env=ONE_THREAD)
    with open(toy / "tuned-contrastive" / "tune.json", encoding="utf-8") as fp:
        return json.load(fp), result


def test_the_contrastive_family_calibrates_on_rows_it_never_measures(toy, contrastive):
    record, _result = contrastive
    measured = record["settings"]["measurement_rows"]
    assert len(measured) == 3 and record["calibration"]["task_rows"] == 3  # split_halves of the 6 rows
    assert sorted(measured + record["calibration"]["rows"]) == list(range(6))  # disjoint, every row used
    assert [p["key"] for p in record["points"]] == ["contrastive lam=30", "contrastive lam=0.3"]
    doc = yaml.safe_load(record["points"][0]["recipe"])
    assert doc["parameters"]["fusion"] == "contrastive" and doc["parameters"]["lam"] == 30.0
    assert [m["parameters"]["role"] for m in doc["models"]] == ["aligned"]
    assert (toy / doc["parameters"]["calibration"]).is_file()


def test_a_contrastive_point_is_bit_identical_to_mergekit_yaml(toy, contrastive, monkeypatch):
    record, _ = contrastive
    monkeypatch.chdir(toy)
    text = record["points"][1]["recipe"]
    plan = plan_recipe(MergeConfiguration.model_validate(yaml.safe_load(text)))
    model, _tokenizer = load_model("finetuned")
    resident = Resident(model, plan.tensors)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    terms = lssf_terms(plan, [Point("contrastive", "lam", 30.0), Point("contrastive", "lam", 0.3)], cpu, progress=False)
    _check_point(resident, lssf_tensors(terms, 1, cpu), _merge(toy, text, "m-contrastive"), original)


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
