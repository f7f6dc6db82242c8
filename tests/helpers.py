"""Helpers shared by the tests that run the commands in subprocesses."""

import os
import subprocess
import sys

import yaml
from safetensors.torch import load_file

BIN = os.path.dirname(sys.executable)


def run_cli(args, cwd, check=True, timeout=900, env=None):
    """Run an installed command (mergekit-yaml, mergekit-lssf, ...) of this venv;
    ``env``: variables to set on top of this process's environment."""
    exe = os.path.join(BIN, args[0])
    result = subprocess.run([exe if os.path.exists(exe) else args[0], *args[1:]], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def load_state(path):
    """Every tensor of the .safetensors files in a model folder."""
    state = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, f)))
    return state


def write_lssf_recipe(directory, name, parameters, base="./finetuned", **extra):
    """An lssf recipe over ./aligned and ./unaligned in ``directory``; returns ``name``."""
    doc = {
        "merge_method": "lssf",
        "base_model": base,
        "models": [
            {"model": "./aligned", "parameters": {"role": "aligned"}},
            {"model": "./unaligned", "parameters": {"role": "unaligned"}},
        ],
        "parameters": parameters,
        "dtype": "float32",
        **extra,
    }
    with open(os.path.join(directory, name), "w", encoding="utf-8") as fp:
        yaml.safe_dump(doc, fp)
    return name
