"""benchmarks/bench_tune.py: the arithmetic of the tune estimate (issue 48's 8B figure), checked by hand."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from bench_tune import MODELS, default_estimate, layer_shapes, tune_defaults, tune_estimate  # noqa: E402


def test_a_llama_layer_has_seven_fused_weights_of_four_shapes():
    assert layer_shapes(MODELS["Llama-3-8B"]) == {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}
    assert sum(layer_shapes(MODELS["SmolLM2-135M"]).values()) == 7


def test_the_estimate_counts_tunes_calls_at_its_defaults():
    """tune's defaults as tune itself declares them (TuneOptions, its prompt caps), and the
    estimate's arithmetic at them, by hand."""
    from mergekit_lssf.tune import TuneOptions

    defaults = tune_defaults()
    opts = TuneOptions()
    assert defaults == {"points": 10, "families": 2, "harmful": 64, "benign": 30, "batch": 24, "new_tokens": 32}
    assert (opts.points * len(opts.families), opts.batch_size, opts.max_new_tokens) == (10, 24, 32)
    parts = {"batch": 24, "generate_layer_s": 0.5, "generate_rest_s": 2.0, "forward_layer_s": 0.1, "forward_rest_s": 0.4,
             "apply_layer_s": 0.01, "apply_outer_s": 0.2, "term_layer_s": 3.0}
    got = default_estimate(parts, MODELS["SmolLM2-135M"], defaults)  # 30 layers, 32 measurement rows
    generate, forward = 2.0 + 30 * 0.5, 0.4 + 30 * 0.1  # 17 s a generate call, 3.4 s a forward
    measurement = (3 + 2) * generate + (2 + 1) * forward  # ceil(64/24) + ceil(30/24) calls; ceil(32/24) + the prose
    assert got["measurement_s"] == pytest.approx(measurement)
    # 12 measurements (10 points, the fine-tune, the aligned model); 10 points applied, 5 of them interpolation
    assert got["total_s"] == pytest.approx(12 * measurement + 10 * 30 * 0.01 + 5 * 0.2 + 30 * 3.0)
    without_terms = tune_estimate({k: v for k, v in parts.items() if k != "term_layer_s"}, MODELS["SmolLM2-135M"],
                                  points=4, harmful=24, benign=1, task_rows=48)
    assert without_terms["total_s"] == pytest.approx(6 * (2 * generate + 3 * forward) + 4 * 30 * 0.01)


def test_the_agreement_check_needs_every_verdict_equal_and_utility_within_a_hundredth(tmp_path):
    """benchmarks/tune_agreement.compare on a made-up testbed folder and tune record."""
    import json

    from tune_agreement import compare

    (tmp_path / "eval").mkdir()
    flags = [1, 0, 1, 1]

    def evaluation(name, nll, refused):
        rows = [{"prompt": f"p{i}", "response": "", "refused": bool(f)} for i, f in enumerate(refused)]
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(
            {"refusal_rate": sum(refused) / len(refused), "task_nll": nll, "responses": {"harmful": rows},
             "task_rows": [[nll, 1, 0.0]] * 3}))

    evaluation("finetuned", 1.0, [0, 0, 0, 0])
    evaluation("aligned", 3.0, [1, 1, 1, 1])
    evaluation("interpolate-0.25", 1.2, flags)  # utility kept (3 - 1.2) / (3 - 1) = 0.9
    evaluation("interpolate-0.5", 2.0, [1, 1, 1, 1])  # 0.5

    def record(nll_025, flags_025, rows=3):
        point = lambda value, nll, refused: {"family": "interpolation", "value": value, "task_nll": nll,  # noqa: E731
                                             "refused": {"harmbench": refused},
                                             "refusal": {"harmbench": sum(refused) / len(refused)}}
        return {"references": {"finetuned": {"task_nll": 2.0, "task_rows": [[2.0, 1]] * rows},  # its own references
                               "aligned": {"task_nll": 4.0}},
                "points": [point(0.25, nll_025, flags_025), point(0.5, 3.0, [1, 1, 1, 1])]}

    same = compare(str(tmp_path), record(2.2, flags))  # (4 - 2.2) / 2 = 0.9 and 0.5: both sides agree
    assert same["agree"] and [r["utility_tune"] for r in same["levels"]] == pytest.approx([0.9, 0.5])
    assert compare(str(tmp_path), record(2.2, [1, 1, 0, 1]))["levels"][0]["verdicts_differ"] == 2  # same rate, other prompts
    assert not compare(str(tmp_path), record(2.2, [1, 1, 0, 1]))["agree"]
    assert not compare(str(tmp_path), record(2.23, flags))["agree"]  # utility 0.885 against 0.9
    assert compare(str(tmp_path), record(2.21, flags))["agree"]  # 0.895: within 0.01
    with pytest.raises(SystemExit, match="not the same rows"):
        compare(str(tmp_path), record(2.2, flags, rows=4))
