"""The package as users get it: a wheel built from this tree, installed into a fresh
virtualenv (no editable install, no source tree on the path), then used from there.

An editable install once hid a wheel that could not even be imported (the start-up
hook was missing from it); this test builds the real wheel every run. It takes about
two minutes (torch comes from pip's cache or local disk, the rest from the registry).
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from helpers import load_state, write_lssf_recipe
from reference import reference_fuse

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TORCH_VERSION = torch.__version__.split("+")[0]


def _run(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    free_gb = shutil.disk_usage(cwd).free / 1e9  # venv's ensurepip hides its own error; a full disk is the usual cause
    assert result.returncode == 0, (f"{args} failed ({result.returncode}, {free_gb:.1f} GB free):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fp:
        return fp.read()


# the README's way to install without the source tree; the fixture below does the same
WHEEL_BUILD = "pip wheel --no-deps . -w dist/"
WHEEL_INSTALL = "pip install torch==2.13.0 && pip install dist/mergekit_lssf-*.whl"


def test_the_readme_installs_from_the_clone_as_this_test_does():
    """The package is not on a registry: the README says so and installs from the clone
    (editable, or the wheel this module builds), never with a bare `pip install mergekit-lssf`."""
    readme = _readme()
    assert WHEEL_BUILD in readme and WHEEL_INSTALL in readme
    assert "not on PyPI" in readme
    assert not re.search(r"pip install mergekit-lssf\b", readme)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel path, bin folder of a fresh virtualenv with that wheel installed)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # WHEEL_BUILD, run in the clone (-q and an absolute -w added)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", ".", "-w", str(dist)], cwd=ROOT)
    (wheel,) = dist.glob("mergekit_lssf-*.whl")
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run([base_python, "-m", "venv", str(root / "venv")], cwd=root)
    bin_dir = root / "venv" / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(pip + [f"torch=={TORCH_VERSION}"], cwd=root)  # first: never the CUDA build
    _run(pip + [str(wheel)], cwd=root)
    return wheel, bin_dir


@pytest.mark.slow
def test_wheel_contents(wheel_venv):
    wheel, _ = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    required = {
        "mergekit_lssf.pth", "mergekit_lssf_startup.py", "mergekit_lssf/__init__.py",
        "mergekit_lssf/registration.py", "mergekit_lssf/recipes/demo.yml",
        "mergekit_lssf/recipes/demo-calibrated.yml", "mergekit_lssf/data/harmbench/prompts.jsonl",
        "mergekit_lssf/data/harmbench/LICENSE", "mergekit_lssf/data/benign/prompts.jsonl",
        "mergekit_lssf/data/benign/text.txt",
    }
    assert required <= names, sorted(required - names)
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names)
    # one source of truth for the hook: the package holds no second copy
    assert not any(n.startswith("mergekit_lssf/") and "startup" in n for n in names)
    # every file the package reads through importlib.resources is in the wheel
    import re

    for module in ("cli.py", "calibrate.py", "evaluate.py"):
        with open(os.path.join(ROOT, "mergekit_lssf", module), encoding="utf-8") as fp:
            source = fp.read()
        assert "os.pardir" not in source, f"{module} reads a path relative to the source tree"
        for path in re.findall(r'"((?:data|recipes)/[\w./-]+)"', source):
            assert f"mergekit_lssf/{path}" in names, (module, path)


@pytest.mark.slow
def test_wheel_registers_lssf_in_a_fresh_process(wheel_venv, tmp_path):
    _, bin_dir = wheel_venv
    python = str(bin_dir / "python")
    out = _run([python, "-c", "import mergekit.merge_methods as m; print(m.get('lssf').spec.name)"], cwd=tmp_path)
    assert out.stdout.strip() == "lssf" and "could not hook" not in out.stderr
    out = _run([python, "-c", "import mergekit_lssf, mergekit_lssf_startup; print(mergekit_lssf.__file__, mergekit_lssf_startup.__file__)"], cwd=tmp_path)
    assert all(os.path.join("venv", "lib") in path for path in out.stdout.split()), out.stdout
    assert "Usage: mergekit-lssf" in _run([str(bin_dir / "mergekit-lssf"), "--help"], cwd=tmp_path).stdout


@pytest.mark.slow
def test_wheel_mergekit_yaml_matches_reference(wheel_venv, toy_dir, tmp_path):
    _, bin_dir = wheel_venv
    recipe = write_lssf_recipe(toy_dir, "wheel.yml", {"alpha": 0.7, "eta": 0.85})
    out = tmp_path / "merged"
    result = _run([str(bin_dir / "mergekit-yaml"), recipe, str(out)], cwd=toy_dir)
    assert "lssf: fused 14 tensors" in result.stderr
    merged, ft = load_state(out), load_state(toy_dir / "finetuned")
    al, un = load_state(toy_dir / "aligned"), load_state(toy_dir / "unaligned")
    for name, tensor in merged.items():
        if tensor.ndim == 2 and "embed" not in name and "lm_head" not in name:
            ref, _ = reference_fuse(ft[name].numpy(), al[name].numpy(), un[name].numpy(), alpha=0.7, eta=0.85, max_rank=256, fusion="restore")
            assert np.linalg.norm(tensor.double().numpy() - ref) / np.linalg.norm(ref) < 1e-5, name
        else:
            assert torch.equal(tensor, ft[name]), name


@pytest.mark.slow
def test_wheel_merges_bf16_checkpoints_as_users_have_them(wheel_venv, tmp_path):
    """bf16 toy checkpoints, the recommended recipe (compute float32, write bf16), the
    installed wheel: bf16 output within rounding of the float64 reference, edge reported."""
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    _, bin_dir = wheel_venv
    build_toy_models(str(tmp_path), ToySpec(size="tiny", dtype="bfloat16", seed=4))
    recipe = write_lssf_recipe(tmp_path, "bf16.yml", {"round_to": "bfloat16"}, out_dtype="bfloat16")
    result = _run([str(bin_dir / "mergekit-yaml"), recipe, str(tmp_path / "merged")], cwd=tmp_path)
    assert "weights from 16-bit inputs; signal rank" in result.stderr
    assert "the written weights keep min" in result.stderr
    merged, ft = load_state(tmp_path / "merged"), load_state(tmp_path / "finetuned")
    al, un = load_state(tmp_path / "aligned"), load_state(tmp_path / "unaligned")
    for name, tensor in merged.items():
        assert tensor.dtype == ft[name].dtype == torch.bfloat16, name
        if tensor.ndim == 2 and "embed" not in name and "lm_head" not in name:
            ref, _ = reference_fuse(*(x[name].double().numpy() for x in (ft, al, un)), alpha=1.0, eta=0.9,
                                    max_rank=256, fusion="restore")
            assert np.abs(tensor.double().numpy() - ref).max() <= 1.5 * np.abs(ref).max() * 2.0 ** -8, name


@pytest.mark.slow
def test_wheel_runs_the_quickstart_demo_as_the_readme_quotes_it(wheel_venv, tmp_path):
    """`mergekit-lssf demo` (the Quickstart's, default size) from the installed wheel, with
    its packaged recipe: the line the README quotes, to within the last printed digit."""
    _, bin_dir = wheel_venv
    out = _run([str(bin_dir / "mergekit-lssf"), "demo", "--workdir", str(tmp_path / "demo")], cwd=tmp_path)
    assert "differ from the fine-tune: 0" in out.stdout, out.stdout[-2000:]
    pattern = (r"Planted safety delta present \(aligned = 1\.00\): fine-tune ([\d.]+) -> LSSF output ([\d.]+);"
               r"\s+task drift kept ([\d.]+) \(mean over (\d+) fused tensors\)")
    pattern = pattern.replace(" ", r"\s+")  # the README may wrap the line anywhere
    quoted = re.search(pattern, _readme())
    printed = re.search(pattern, out.stdout)
    assert quoted, "the README no longer quotes the demo's result line"
    assert printed, out.stdout[-2000:]
    for q, p in zip(quoted.groups(), printed.groups()):
        assert abs(float(q) - float(p)) <= 0.002, (quoted.group(0), printed.group(0))
