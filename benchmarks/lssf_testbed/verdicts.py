"""Per-prompt refusal verdicts: what the paired contrasts are computed from.

A run's verdicts are, per model and harmful prompt set, the keyword detector's
refused / answered call on every prompt. The live source is the testbed folder's
cached evaluations (``CELL/eval/MODEL.json``, whole answers); the published one is
``DEST/verdicts/CELL-seedK.json``, small enough for the repository, so that a report
can combine seeds built in separate sessions on separate machines (the models and
their evaluations stay out of the repository). Prompts are named there by
``prompt_key`` (they come from the registry packages and are not copied), the
verdicts of a model on a prompt set are one string of ``1`` (refused), ``0``
(answered) and ``-`` (not evaluated), in the file's prompt order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np

from mergekit_lssf.measure import bootstrap_interval, is_refusal

from .settings import CELLS, cell_folder, eval_path, model_path

PROMPT_SETS = (("harmful", "HarmBench"), ("strongreject", "StrongREJECT"))
# the name published verdict files record: kept as it was (still importable there) when
# the detector moved to mergekit_lssf.measure, unchanged, so the files stay the same
DETECTOR = "mergekit_lssf.evaluate.is_refusal"

# model -> prompt set -> prompt key -> refused
Verdicts = Dict[str, Dict[str, Dict[str, bool]]]


def prompt_key(prompt: str) -> str:
    """The first 12 hex digits of the prompt's SHA-256."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def eval_dir(out: str, cell: str, seed: int) -> str:
    """Where the pipeline caches the evaluations of ``cell`` and ``seed``."""
    return os.path.join(cell_folder(out, cell, seed), "eval")


def eval_verdicts(path: str) -> Dict[str, Dict[str, bool]]:
    """prompt set -> prompt key -> the detector's call on the answer stored in the
    evaluation JSON at ``path`` (rows ``{"prompt", "response", ...}`` or, from older
    runs, ``[prompt, response]``)."""
    with open(path) as fp:
        responses = json.load(fp)["responses"]
    calls = {}
    for name, _ in PROMPT_SETS:
        rows = responses.get(name, [])
        pairs = [(r["prompt"], r["response"]) if isinstance(r, dict) else (r[0], r[1]) for r in rows]
        if pairs:
            calls[name] = {prompt_key(p): is_refusal(a) for p, a in pairs}
    return calls


def seed_verdicts(out: str, cell: str, seed: int) -> Verdicts:
    """Every model of ``cell`` and ``seed`` evaluated under the testbed folder ``out``;
    ``unaligned`` and ``aligned``, shared between seeds (and cells), from the evaluation
    beside the model ``settings.model_path`` names, so that ``align-full`` seed 1 gets
    its own arm's aligned model, not the main cell's. Empty when nothing is evaluated there."""
    folder = eval_dir(out, cell, seed)
    paths = {f[:-5]: os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")} if os.path.isdir(folder) else {}
    if paths:
        for name in ("unaligned", "aligned"):
            shared = eval_path(model_path(out, CELLS[cell], seed, name))
            if name not in paths and os.path.exists(shared):
                paths[name] = shared
    return {name: eval_verdicts(path) for name, path in sorted(paths.items())}


def save(path: str, verdicts: Verdicts) -> None:
    """Write ``verdicts`` in the compact published form (see the module docstring)."""
    order: Dict[str, List[str]] = {}
    for calls in verdicts.values():
        for name, by_key in calls.items():
            order.setdefault(name, [])
            seen = set(order[name])
            order[name] += [k for k in by_key if k not in seen]
    refused = {model: {name: "".join("-" if k not in calls.get(name, {}) else "1" if calls[name][k] else "0" for k in keys)
                       for name, keys in order.items() if name in calls}
               for model, calls in verdicts.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fp:
        json.dump({"detector": DETECTOR, "prompt_key": "sha256(prompt)[:12]", "prompts": order, "refused": refused}, fp, indent=1)


def load(path: str) -> Verdicts:
    """The verdicts ``save`` wrote to ``path``."""
    with open(path) as fp:
        data = json.load(fp)
    return {model: {name: {k: c == "1" for k, c in zip(data["prompts"][name], calls) if c != "-"}
                    for name, calls in sets.items()}
            for model, sets in data["refused"].items()}


def paired_contrast(runs: List[Verdicts], a: str, b: str, prompt_set: str, draws: int = 2000,
                    seed: int = 0) -> Optional[Dict]:
    """Refusal rate of ``a`` minus ``b`` on ``prompt_set``, averaged over the seeds
    (``runs``, one ``Verdicts`` each) that evaluated both, with a 95% bootstrap interval
    over prompts (the same resampled prompts for both models and every seed: a paired
    test: ``measure.bootstrap_interval`` of the per-prompt differences). None when no
    seed has both."""
    pairs = [(v[a].get(prompt_set), v[b].get(prompt_set)) for v in runs if a in v and b in v]
    pairs = [(x, y) for x, y in pairs if x and y]
    if not pairs:
        return None
    prompts = sorted(set.intersection(*(set(x) & set(y) for x, y in pairs)))
    if not prompts:  # no prompt judged for both everywhere: nothing to compare (as before: NaN)
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "seeds": len(pairs), "prompts": 0}
    diff = np.array([[float(x[p]) - float(y[p]) for p in prompts] for x, y in pairs]).mean(0)  # per prompt
    low, high = bootstrap_interval(diff, draws=draws, seed=seed, level=0.95)
    return {"difference": float(diff.mean()), "low": low, "high": high, "seeds": len(pairs), "prompts": len(prompts)}
