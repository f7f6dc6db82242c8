"""Smoke test of every safety-testbed stage on a generated tiny model (no long training)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from safety_testbed import Settings, Testbed, sentiment_task  # noqa: E402

from mergekit_lssf.toy_models import ToySpec, build_toy_models  # noqa: E402


def test_sentiment_task_is_balanced_and_labelled():
    rows = sentiment_task(20, seed=3)
    assert [r["label"] for r in rows].count("positive") == 10
    assert all(r["prompt"].startswith("Review: ") and r["label"] in ("positive", "negative") for r in rows)


def test_every_stage_on_tiny_settings(tmp_path):
    build_toy_models(str(tmp_path / "toy"), ToySpec(size="tiny", seed=8))
    bed = Testbed(str(tmp_path / "bed"), Settings.tiny(str(tmp_path / "toy" / "unaligned")), log=lambda m: None)
    summary = bed.run()
    expected = {"unaligned", "aligned", "finetuned", "lssf", "lssf-calibrated", "task-arithmetic", "lssf-rank10", "lssf-rank50", "lssf-alpha0.5"}
    assert set(summary["models"]) == expected
    for name in expected:
        model_dir = tmp_path / "bed" / "models" / name
        assert (model_dir / "config.json").exists() and (model_dir / "tokenizer_config.json").exists(), name
        r = summary["models"][name]
        assert 0 <= r["refusal_rate"] <= 1 and 0 <= r["task_accuracy"] <= 1 and r["perplexity"] > 1
    assert (tmp_path / "bed" / "aligned.subspace.safetensors").exists()
    table = (tmp_path / "bed" / "results.md").read_text()
    assert table.count("\n| ") >= len(expected)
    assert (tmp_path / "bed" / "safety_vs_task.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "bed" / "results.json").read_text())["models"] == summary["models"]
    # resumable: a second run reuses every cached stage and gives the same numbers
    again = Testbed(str(tmp_path / "bed"), Settings.tiny(str(tmp_path / "toy" / "unaligned")), log=lambda m: None).run()
    assert again["models"] == summary["models"]
