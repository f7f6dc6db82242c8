"""Smoke test of every safety-testbed v2 stage and cell on a generated tiny model."""

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from lssf_testbed.data import PromptSets, replay_openings, sentiment_task, strongreject_prompts  # noqa: E402
from lssf_testbed.pipeline import Testbed  # noqa: E402
from lssf_testbed.settings import CELLS, Settings, candidate_name, model_path, settings_digest  # noqa: E402

from mergekit_lssf.toy_models import ToySpec, build_toy_models  # noqa: E402

MAIN_MODELS = {
    "unaligned", "aligned", "finetuned", "lssf", "lssf-calibrated", "task-arithmetic", "lssf-rank10", "lssf-rank50",
    "lssf-noise-floor", "lssf-restore", "lssf-noise-floor-restore", "lssf-alpha0.5", "random-subspace", "random-restore",
    "random-noise-floor-restore", "random-spectrum", "random-spectrum-restore",
    "patch-reapplied", "ablate-attention", "ablate-mlp", "ablate-first-half", "ablate-second-half",
}


def test_sentiment_task_is_balanced_and_labelled():
    rows = sentiment_task(20, seed=3)
    assert [r["label"] for r in rows].count("positive") == 10
    assert all(r["prompt"].startswith("Review: ") and r["label"] in ("positive", "negative") for r in rows)


def test_prompt_splits_are_disjoint_and_strongreject_is_the_published_file():
    sets = PromptSets(Settings())
    assert len(sets.harmful_train) == 112 and len(sets.harmful_val) == 16 and len(sets.harmful_test) == 72
    assert not set(sets.harmful_train) & set(sets.harmful_val)
    assert not (set(sets.harmful_train) | set(sets.harmful_val)) & set(sets.harmful_test)
    assert not set(sets.benign_train) & set(sets.benign_val)
    assert len(strongreject_prompts()) == 313  # SHA-256 checked on load


def test_alignment_candidates_have_distinct_cache_names_and_replay_openings_are_new_text():
    """The sweeps' caches are keyed by setting: two candidates may never share a folder.
    The prose-replay openings are written for the project and share no sentence with the
    validation or test prose."""
    from lssf_testbed.data import validation_prose
    from mergekit_lssf import evaluate as ev

    names = [candidate_name(c) for c in Settings().align_candidates]
    assert len(set(names)) == len(names)
    assert candidate_name(dict(rank=16, lr=2e-4, epochs=2, benign_repeat=4, prose=2)) == "r16-lr0.0002-e2-b4-p2"
    openings = replay_openings()
    assert len(openings) == len(set(openings)) == 48
    held_out = validation_prose() + ev.benign_text()
    assert not [o for o in openings if o in held_out]


def test_prose_replay_examples_put_the_loss_on_the_sampled_continuation_only(tmp_path):
    """``sample_continuations`` draws ``samples`` seeded continuations per context, in
    context order; ``_text_examples`` masks the context (-100) and labels
    every continuation token, so the loss is the continuation's alone."""
    from lssf_testbed.training import _text_examples, sample_continuations
    from transformers import AutoTokenizer

    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=5))
    contexts = ["The lighthouse was built of stone", "Bees gather nectar"]
    pairs = sample_continuations(str(tmp_path / "aligned"), contexts, samples=2, tokens=6, seed=3, batch_size=3)
    assert [c for c, _ in pairs] == [contexts[0]] * 2 + [contexts[1]] * 2
    again = lambda seed: sample_continuations(str(tmp_path / "aligned"), contexts, samples=2, tokens=6, seed=seed, batch_size=3)  # noqa: E731
    assert pairs == again(3) and pairs != again(4)  # seeded
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "aligned"))
    for (context, continuation), (ids, labels) in zip(pairs, _text_examples(tokenizer, pairs)):
        head = tokenizer(context, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(labels) and ids[:len(head)] == head
        assert labels[:len(head)] == [-100] * len(head)
        assert labels[len(head):] == ids[len(head):] and -100 not in labels[len(head):]
        assert labels[len(head):] == tokenizer(continuation, add_special_tokens=False)["input_ids"] != []


def test_repair_recipes_name_their_fusion():
    """Every lssf recipe says its fusion: `lssf` and its variants the paper's `add`
    (the package default is `restore`), the restore repairs `restore`."""
    from lssf_testbed import repairs

    built = repairs.recipes("al", "un", "ft", "sub.safetensors", Settings(), layers=4, ablations=True)
    assert list(built) == repairs.recipe_names(Settings(), ablations=True)
    for name, recipe in built.items():
        if recipe["merge_method"] == "lssf":
            assert recipe["parameters"]["fusion"] == ("restore" if name.endswith("restore") else "add"), name
    assert built["lssf"]["parameters"] == {"fusion": "add"}


def test_opening_logprob_is_one_unpadded_float64_pass_per_prompt_and_opening(tmp_path):
    """The continuous refusal score's per-prompt term against an independent float64
    computation: for each prompt and opening, the whole sequence (chat head + opening)
    run alone, unpadded, log-softmax at the opening's positions, then logsumexp over the
    openings. Prompts of different lengths in batches of two exercise the padding and the
    key-value cache."""
    import copy
    import math

    import torch

    from lssf_testbed.evaluation import OPENINGS, _heads, opening_logprob
    from mergekit_lssf import evaluate as ev

    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=4))
    model, tokenizer = ev.load_model(str(tmp_path / "aligned"))
    prompts = ["Hi", "Explain in detail how the water cycle moves water around the Earth", "Name a fruit.",
               "Write two sentences about bread"]
    openings = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in OPENINGS]
    assert max(map(len, openings)) > 1 and min(map(len, openings)) >= 1
    reference = copy.deepcopy(model).double()
    expected = []
    for head in _heads(tokenizer, prompts):
        terms = []
        for o in openings:
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=torch.tensor([head + o])).logits[0], dim=-1)
            terms.append(sum(float(logp[len(head) - 1 + t, token]) for t, token in enumerate(o)))
        top = max(terms)
        expected.append(top + math.log(sum(math.exp(t - top) for t in terms)))
    got = opening_logprob(model, tokenizer, prompts, batch=2)
    assert len(got) == len(prompts)
    for g, e in zip(got, expected):
        assert abs(g - e) < 1e-4, (got, expected)
    assert max(expected) - min(expected) > 1e-3  # the prompts' values differ: a mix-up of rows would show


@pytest.mark.slow
def test_every_stage_and_cell_on_tiny_settings(tmp_path, capsys):
    build_toy_models(str(tmp_path / "toy"), ToySpec(size="tiny", seed=8))
    settings = Settings.tiny(str(tmp_path / "toy" / "unaligned"))
    bed = Testbed(str(tmp_path / "bed"), settings, log=lambda m: None)
    summary = bed.run()  # every cell; the main cell with both tiny seeds
    cells = summary["cells"]
    assert set(cells) == set(CELLS)
    assert cells["main"]["seeds"] == [0, 1]
    assert set(cells["main"]["models"]) == MAIN_MODELS
    assert "unaligned-inverse" in cells["reference-inverse"]["models"]
    assert "patch-reapplied" not in cells["align-full"]["models"]  # no LoRA to reapply
    for name in MAIN_MODELS:
        model_dir = tmp_path / "bed" / "models" / name
        assert (model_dir / "config.json").exists() and (model_dir / "tokenizer_config.json").exists(), name
    for cell in ("align-full", "reference-inverse", "drift-full", "attack", "main-seed1"):
        assert (tmp_path / "bed" / "cells" / cell / "models" / "finetuned" / "config.json").exists(), cell
    # drift seed 0 is the sweep's chosen candidate (same data, setting and seed), copied, not trained again;
    # seed 1 is trained with its own seed
    chosen = tmp_path / "bed" / "sweeps" / "drift-lora" / "candidate0"
    weights = lambda folder: (folder / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(tmp_path / "bed" / "models" / "finetuned") == weights(chosen)
    assert (tmp_path / "bed" / "models" / "finetuned.adapter").is_dir()
    assert weights(tmp_path / "bed" / "cells" / "main-seed1" / "models" / "finetuned") != weights(chosen)
    spread = cells["main"]["models"]["lssf"]["refusal_rate"]
    assert spread["n"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    seed1 = {p.name for p in (tmp_path / "bed" / "cells" / "main-seed1" / "models").iterdir() if (p / "config.json").exists()}
    assert seed1 == {"finetuned", *settings.seed_models}  # only the core repairs for the other seeds
    assert cells["main"]["models"]["lssf-rank10"]["refusal_rate"]["n"] == 1
    pairs = {(c["repair"], c["against"], c["prompts"]): c for c in cells["main"]["contrasts"]}
    assert pairs[("lssf-restore", "random-restore", "StrongREJECT")]["seeds"] == 2
    assert all(c["low"] <= c["difference"] <= c["high"] for c in pairs.values())
    for cell in cells.values():
        for metrics in cell["models"].values():
            assert 0 <= metrics["refusal_rate"]["mean"] <= 1 and 0 <= metrics["strongreject_refusal_rate"]["mean"] <= 1
            assert metrics["perplexity"]["mean"] > 1 and metrics["refusal_score"]["mean"] == metrics["refusal_score"]["mean"]
        assert cell["diagnostics"]["per_module"]["q_proj"]["noise_floor_rank"] >= 0
    assert cells["main"]["models"]["aligned"]["direction_recovery"]["mean"] == pytest.approx(1.0)
    assert cells["main"]["models"]["finetuned"]["direction_recovery"]["mean"] == pytest.approx(0.0)
    assert summary["sweeps"]["align"]["chosen"] in (0, 1) and "drift-lora" in summary["sweeps"]
    full = summary["sweeps"]["align-full"]  # the full-SFT alignment's one setting, with prose replay, checked on validation
    assert full["setting"]["prose"] == 1 and set(full["targets_met"]) == {"refusal", "over_refusal", "perplexity"}
    missed = [k for k, ok in full["targets_met"].items() if not ok]
    assert any(n.startswith("align-full: the full-SFT alignment misses") for n in summary["notes"]) == bool(missed)
    table = (tmp_path / "bed" / "results.md").read_text()
    assert table.count("## cell") == len(CELLS) and "lssf-restore" in table
    for png in ("safety_vs_utility.png", "diagnostics.png"):
        assert (tmp_path / "bed" / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "bed" / "results.json").read_text())
    assert saved["cells"]["main"]["models"]["lssf"] == json.loads(json.dumps(cells["main"]["models"]["lssf"]))
    # resumable: a second run reuses every cached stage and gives the same numbers
    again = Testbed(str(tmp_path / "bed"), settings, log=lambda m: None).run(["main"], [0])
    assert again["cells"]["main"]["models"]["lssf"] == summary["cells"]["main"]["models"]["lssf"]
    assert "evaluate" not in again["timings_seconds"] and "merge" not in again["timings_seconds"]
    # resumed with other settings: refused before anything is built (the cached models would be reused)
    other = dataclasses.replace(settings, drift_candidates=[dict(rank=4, lr=5e-4, epochs=1)])
    with pytest.raises(ValueError, match="cell main was built there with settings [0-9a-f]{12}, these are"):
        Testbed(str(tmp_path / "bed"), other, log=lambda m: None).run(["main"], [0])
    assert json.loads((tmp_path / "bed" / "digests.json").read_text())["main"] == settings_digest(settings, "main")
    # report only: the same tables from the cached evaluations, published elsewhere; a missing one is named
    os.remove(tmp_path / "bed" / "eval" / "lssf-alpha0.5.json")
    published = Testbed(str(tmp_path / "bed"), settings, log=lambda m: None).report_only(["main"], publish=str(tmp_path / "pub"))
    assert published["cells"]["main"]["models"]["lssf"] == summary["cells"]["main"]["models"]["lssf"]
    assert published["cells"]["main"]["models"]["lssf-alpha0.5"]["refusal_rate"]["n"] == 1  # seed 1 only
    assert any(n.startswith("cell main, seed 0: 21 of 22") and n.endswith("not yet: lssf-alpha0.5") for n in published["notes"])
    assert str(tmp_path / "bed") not in (tmp_path / "pub" / "results.md").read_text()
    assert (tmp_path / "pub" / "sweeps" / "align" / "choice.json").exists() and not (tmp_path / "pub" / "models").exists()
    assert sorted(p.name for p in (tmp_path / "pub" / "runs").iterdir()) == ["main-seed0.json", "main-seed1.json"]
    assert sorted(p.name for p in (tmp_path / "pub" / "verdicts").iterdir()) == ["main-seed0.json", "main-seed1.json"]
    # another session publishes seed 1 alone (seed 0's models and evaluations elsewhere): seed 0's published
    # run and verdicts are kept, so the table and the paired contrasts over both seeds are unchanged
    again = Testbed(str(tmp_path / "bed"), settings, log=lambda m: None).report_only(["main"], [1], publish=str(tmp_path / "pub"))
    assert again["cells"]["main"]["contrasts"] == published["cells"]["main"]["contrasts"]
    assert again["cells"]["main"]["models"] == published["cells"]["main"]["models"]
    # a published run built with other settings is refused before anything is written
    seed0 = tmp_path / "pub" / "runs" / "main-seed0.json"
    record, before = json.loads(seed0.read_text()), (tmp_path / "pub" / "results.json").read_text()
    seed0.write_text(json.dumps({**record, "settings_digest": "0123456789ab"}))
    with pytest.raises(ValueError, match="runs/main-seed0.json was built with settings 0123456789ab"):
        Testbed(str(tmp_path / "bed"), settings, log=lambda m: None).report_only(["main"], [1], publish=str(tmp_path / "pub"))
    assert (tmp_path / "pub" / "results.json").read_text() == before
    # control_cosine.py reads the built models by path alone: lssf's term points along delta
    import control_cosine

    capsys.readouterr()
    control_cosine.main(["--out", str(tmp_path / "bed"), "--cell", "reference-inverse"])
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines()[2:]]
    assert rows and all(len(r) == 4 for r in rows)
    assert all(float(r[1]) > 0.5 for r in rows), rows  # lssf's term is delta's top-r part
    # answer_shapes.py reads the cached evaluations: its refusal counts are the evaluation's rates
    import answer_shapes

    table = answer_shapes.main(["--out", str(tmp_path / "bed"), "--model", "aligned", "--model", "lssf", "--examples", "1"])
    for name, sets in table.items():
        with open(Testbed.eval_path(model_path(str(tmp_path / "bed"), CELLS["main"], 0, name))) as fp:
            record = json.load(fp)
        assert sets["harmful"]["refused"] == round(record["refusal_rate"] * sets["harmful"]["n"])
        assert sets["strongreject"]["refused"] == round(record["strongreject_refusal_rate"] * sets["strongreject"]["n"])
        assert sets["benign"]["refused"] == round(record["over_refusal_rate"] * sets["benign"]["n"])
        assert all(0 <= s["fragments"] <= s["refused"] <= s["n"] and 0 <= s["empty"] <= s["n"] for s in sets.values())
    assert answer_shapes.shape([{"response": "Sure, I cannot", "refused": True}, {"response": "I'm sorry, but I can't help with that.",
                                "refused": True}, {"response": " ", "refused": False}], fragment=5) == {
        "n": 3, "mean_words": 11 / 3, "empty": 1, "refused": 2, "fragments": 1, "opening": "Sure, I cannot"}
    with pytest.raises(SystemExit, match="model 'nothing' of cell main seed 0 is not evaluated"):
        answer_shapes.main(["--out", str(tmp_path / "bed"), "--model", "nothing"])
    # alignment_prose_check.py: every alignment candidate scored on the held-out prose, the testbed's own reused
    import alignment_prose_check

    first = tmp_path / "bed" / "sweeps" / "align" / candidate_name(settings.align_candidates[0])
    trained = (first / "model.safetensors").stat().st_mtime_ns
    check = alignment_prose_check.main(["--out", str(tmp_path / "bed")], settings=settings)
    assert [r["candidate"] for r in check["candidates"]] == list(range(len(settings.align_candidates)))
    assert (first / "model.safetensors").stat().st_mtime_ns == trained
    # the tiny second candidate has prose replay: one sampled continuation per opening, cached, trained on
    replay = json.loads((tmp_path / "bed" / "sweeps" / "prose-replay-x1.json").read_text())
    assert [c for c, _ in replay] == replay_openings() and all(t for _, t in replay)
    assert (tmp_path / "bed" / "sweeps" / "align" / (candidate_name(settings.align_candidates[1]) + ".adapter")).is_dir()
    for r in check["candidates"]:
        assert r["perplexity_ratio"] == pytest.approx(r["validation"]["perplexity"] / check["unaligned"]["perplexity"])
        assert r["targets_met"]["perplexity"] == (r["perplexity_ratio"] <= settings.targets["perplexity_ratio"])
    assert "| 0 | rank 4" in capsys.readouterr().out


def test_random_controls_match_rank_and_norm_of_their_repair(tmp_path):
    """random-subspace / random-restore: per weight, the added term has the Frobenius norm
    of lssf's (add) / lssf-restore's term and rank at most that repair's rank, and it is
    not that term (random directions). random-spectrum(-restore): the term has exactly the
    repair's singular values (float64 SVD of the kernel's term), and its row and column
    spaces are random: on this toy the subspace control's |cosine| with the term reaches
    0.38, the spectrum control's stays below 0.07 (bound 0.2)."""
    import torch

    from lssf_testbed import repairs
    from mergekit_lssf.kernel import safety_factors
    from mergekit_lssf.parameters import DEFAULT_ETA, DEFAULT_MAX_RANK

    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=5))
    names = {k: str(tmp_path / k) for k in ("aligned", "unaligned", "finetuned")}
    al, un, ft = (repairs.load_state(names[k]) for k in ("aligned", "unaligned", "finetuned"))
    cosine = lambda x, y: float((x * y).sum() / (x.norm() * y.norm()))  # noqa: E731
    for kind, fusion, rule in (("subspace", "add", "entropy"), ("subspace", "restore", "entropy"),
                               ("subspace", "restore", "noise_floor"), ("spectrum", "add", "entropy"),
                               ("spectrum", "restore", "entropy")):
        out = str(tmp_path / f"random-{kind}-{fusion}-{rule}")
        repairs.random_control(names["aligned"], names["unaligned"], names["finetuned"], out, seed=3, kind=kind,
                               fusion=fusion, rank_rule=rule)
        got = repairs.load_state(out)
        checked, cosines = 0, []
        for name in repairs.fused_names(ft):
            a, u, w = al[name].double(), un[name].double(), ft[name].double()
            f = safety_factors(a, u, eta=DEFAULT_ETA, max_rank=DEFAULT_MAX_RANK, fusion=fusion, rank_rule=rule).with_finetune(w)
            term = got[name].double() - w
            if f.info.rank == 0:
                assert torch.equal(got[name], ft[name])
                continue
            reference = (f.left @ f.right).double()
            assert abs(term.norm() - reference.norm()) <= 1e-4 * reference.norm() + 1e-6, name
            assert torch.linalg.matrix_rank(term, rtol=1e-5) <= f.info.rank
            assert (term - reference).norm() > 1e-2 * reference.norm()
            if kind == "spectrum":
                r = f.info.rank
                want = torch.linalg.svdvals(reference)[:r]
                have = torch.linalg.svdvals(term)[:r]
                assert torch.allclose(have, want, rtol=1e-4, atol=1e-6 * float(want[0])), name
            cosines.append(abs(cosine(term, reference)))
            checked += 1
        assert checked > 0
        if kind == "spectrum":
            assert max(cosines) < 0.2, (fusion, cosines)


def test_term_cosines_are_per_module_means_of_the_flattened_cosine(tmp_path):
    """cos(W_repaired - W_ft, W_aligned - W_reference) per weight, averaged per module,
    against numpy in float64; delta itself as the term gives 1, its negative -1."""
    import numpy as np

    from lssf_testbed import repairs
    from lssf_testbed.diagnostics import LAYER, term_cosines

    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=6))
    names = {k: str(tmp_path / k) for k in ("aligned", "unaligned", "finetuned")}
    got, again = term_cosines(names["aligned"], names["unaligned"], names["finetuned"], [names["aligned"], names["aligned"]])
    al, un, ft = (repairs.load_state(names[k]) for k in ("aligned", "unaligned", "finetuned"))
    expected = {}
    for name in repairs.fused_names(ft):
        t = al[name].double().numpy().ravel() - ft[name].double().numpy().ravel()
        d = al[name].double().numpy().ravel() - un[name].double().numpy().ravel()
        expected.setdefault(LAYER.search(name).group(3), []).append(t @ d / (np.linalg.norm(t) * np.linalg.norm(d)))
    assert set(got) == set(expected) and len(got) > 1 and again == got
    for module, values in expected.items():
        assert got[module] == pytest.approx(float(np.mean(values)), abs=1e-9), module
    [ones] = term_cosines(names["aligned"], names["unaligned"], names["unaligned"], [names["aligned"]])
    [minus] = term_cosines(names["aligned"], names["unaligned"], names["aligned"], [names["unaligned"]])
    assert all(v == pytest.approx(1.0) for v in ones.values()) and all(v == pytest.approx(-1.0) for v in minus.values())


def test_paired_contrast_is_the_mean_per_prompt_difference_with_a_bootstrap_interval(tmp_path):
    from lssf_testbed.verdicts import eval_verdicts, load, paired_contrast, prompt_key, save

    def write(name, refused):  # refused: list of bools, prompt i -> "p{i}"
        path = tmp_path / f"{name}.json"
        rows = [{"prompt": f"p{i}", "response": "I'm sorry, no." if r else "Sure, here is"} for i, r in enumerate(refused)]
        path.write_text(json.dumps({"responses": {"harmful": rows}}))
        return eval_verdicts(str(path))

    n = 40
    seed0 = {"a": write("a0", [True] * n), "b": write("b0", [i % 2 == 0 for i in range(n)])}
    seed1 = {"a": write("a1", [i < 30 for i in range(n)]), "b": write("b1", [i < 10 for i in range(n)])}
    assert seed0["b"]["harmful"][prompt_key("p2")] is True and seed0["b"]["harmful"][prompt_key("p3")] is False
    c = paired_contrast([seed0, seed1], "a", "b", "harmful")
    # independent: per-seed rate differences 0.5 and 0.5, mean 0.5
    assert c["seeds"] == 2 and c["prompts"] == n and abs(c["difference"] - 0.5) < 1e-12
    assert c["low"] < 0.5 < c["high"] and c["high"] - c["low"] < 0.5
    same = paired_contrast([seed0], "a", "a", "harmful")
    assert same["difference"] == same["low"] == same["high"] == 0.0
    assert paired_contrast([{"a": seed0["a"]}], "a", "b", "harmful") is None  # no seed has both
    # the published form gives back the same verdicts, a prompt one model lacks included
    seed1["c"] = {"harmful": {k: v for k, v in list(seed1["b"]["harmful"].items())[5:]}}
    save(str(tmp_path / "v" / "main-seed1.json"), seed1)
    assert load(str(tmp_path / "v" / "main-seed1.json")) == seed1
    assert "p1" not in (tmp_path / "v" / "main-seed1.json").read_text()  # prompts are named by key only
    assert paired_contrast([seed0, load(str(tmp_path / "v" / "main-seed1.json"))], "a", "b", "harmful") == c


def test_a_cells_settings_digest_changes_with_the_settings_it_reads_only():
    s = Settings()
    digests = {cell: settings_digest(s, cell) for cell in CELLS}
    assert len(set(digests.values())) == len(CELLS)  # every cell reads a different set of fields
    changed = dataclasses.replace(s, full_align={**s.full_align, "lr": 1e-5})
    assert settings_digest(changed, "align-full") != digests["align-full"]
    assert all(settings_digest(changed, c) == digests[c] for c in CELLS if c != "align-full")
    shared = dataclasses.replace(s, harmful_test=s.harmful_test - 1)  # every cell evaluates on it
    assert all(settings_digest(shared, c) != digests[c] for c in CELLS)


def test_report_only_flags_are_checked_before_anything_is_written(tmp_path, capsys):
    import safety_testbed

    with pytest.raises(SystemExit):
        safety_testbed.main(["--out", str(tmp_path / "none"), "--report-only"])
    assert "no testbed folder there" in capsys.readouterr().err and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        safety_testbed.main(["--out", str(tmp_path), "--publish", str(tmp_path / "pub")])
    assert "--publish needs --report-only" in capsys.readouterr().err and not (tmp_path / "pub").exists()
    (tmp_path / "bed" / "models").mkdir(parents=True)
    (tmp_path / "old" / "runs").mkdir(parents=True)
    (tmp_path / "old" / "runs" / "main-seed0.json").write_text(json.dumps({"cell": "main", "seed": 0, "models": {}}))
    with pytest.raises(SystemExit):
        safety_testbed.main(["--out", str(tmp_path / "bed"), "--report-only", "--publish", str(tmp_path / "old")])
    err = capsys.readouterr().err
    assert "runs/main-seed0.json was built with settings None" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["runs"]
