"""Helpers shared by the tests: running the commands in subprocesses, reading model
folders, and the rows and activations the contrastive and baseline tests build themselves."""

import os
import subprocess
import sys

import numpy as np
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


WORDS = ["make", "build", "find", "explain", "write", "the", "a", "weapon", "poem", "recipe", "plan", "list",
         "how", "to", "bake", "bread", "hack", "account", "story", "about", "cats", "dogs", "rain", "code"]


def word_rows(seed, n):
    """``n`` (prompt, answer) pairs of random words: 6-word prompts, 9-word answers."""
    rng = np.random.default_rng(seed)
    say = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    return [(say(6), say(9)) for _ in range(n)]


def linear_inputs(model_dir, rows):
    """float64 inputs ``(tokens, d_in)`` of every linear weight of the decoder blocks,
    taken with transformers' own model and forward pre-hooks: each row rendered as
    training renders it (chat template, no added special tokens) and run alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, key=f"{name}.weight"):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double().numpy())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for prompt, answer in rows:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}
