"""benchmarks/gpu_check.py end to end on the CPU with toy models (its --tiny smoke test)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.py")


def test_gpu_check_tiny_on_cpu_runs_every_step(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["tests", "models", "merge", "cpu-vs-device", "precision", "executors", "contrastive", "tune"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "passed")
    assert all(c["rank"] == c["reference_rank"] for c in steps["tests"]["kernel_vs_float64_reference"])
    assert steps["merge"]["lssf"]["spectral_s"] is not None and steps["merge"]["time_ratio"] > 0
    assert steps["cpu-vs-device"]["identical_ranks"] and steps["executors"]["threads_match_sequence"]
    for row in steps["precision"]["shapes"]:
        assert row["float64"]["entropy_rank"] > 0 and row["float64"]["noise_floor_rank"] > 0
        assert isinstance(row["float32"]["same_ranks_as_float64"], bool) and isinstance(row["mixed"]["same_ranks_as_float64"], bool)
    estimate = steps["contrastive"]["estimate_8b"]
    assert estimate["total_s"] == estimate["forward_s"] + estimate["grams_s"] + estimate["solves_s"] > 0
    assert set(steps["contrastive"]["parts"]["solve_s"]) == {"256", "896"}  # both widths measured on the tiny shape
    tune = steps["tune"]["estimate_8b"]
    assert tune["total_s"] == pytest.approx(tune["measurements"] * tune["measurement_s"] + tune["apply_s"] + tune["terms_s"])
    assert tune["measurements"] == 12 and tune["terms_s"] > 0  # 2 families x 5 points + the two references
    assert "| merge | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_records_a_timed_out_step_and_goes_on(tmp_path):
    import argparse

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    args = argparse.Namespace(out=str(tmp_path), device="cpu", tiny=True)
    report = gpu_check.run_steps(args, {"steps": {}}, ["tests", "precision"], {"tests": 0.01, "precision": 120})
    assert report["steps"]["tests"]["status"] == "timed out after 0.01 s"
    assert report["steps"]["precision"]["status"] == "passed"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"].keys() == {"tests", "precision"}


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the refusal cannot be shown")
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
