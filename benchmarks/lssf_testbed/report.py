"""results.json, results.md and a safety-utility figure per cell.

Every cell-and-seed run is kept as ``DIR/runs/CELL-seedK.json`` (with the digest of
the settings it was built with, and the per-row task NLL of every model) and its
per-prompt refusal verdicts as ``DIR/verdicts/CELL-seedK.json``; the report is rebuilt
from all of them, so cells and seeds built in separate invocations, or sessions
publishing into the same folder, add up. Per cell: every model's metrics (mean and
[min, max] over seeds), the curves (``frontier.curve_points``) drawn as
``curves-CELL.png`` (x = utility kept, y = refusal won back), the refusal won back at
a utility cost of at most 1%, 2% and 5% (``frontier.BUDGETS``) per method with bootstrap intervals
(``frontier.budget_table``), the rank-matched LSSF-vs-random paired contrasts and
Safe LoRA's choice on validation.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
from dataclasses import asdict
from typing import Dict, List, Optional

import matplotlib
from matplotlib.figure import Figure

from mergekit_lssf.measure import utility_kept, won_back

from .curves import CHOSEN_METHODS, CURVES, RULES, SEED0_CURVES, SINGLES, points
from .settings import CELLS, SettingsMismatch, has_seed0_families, settings_digest
from .frontier import BUDGETS, SETS, RunArrays, budget_table, curve_points, spread
from .verdicts import PROMPT_SETS, Verdicts, paired_contrast, seed_verdicts
from .verdicts import load as load_verdicts
from .verdicts import save as save_verdicts

# harmful prompt set (frontier.SETS) -> its refusal-rate field in an evaluation
RATE_COLUMNS = (("harmful", "refusal_rate"), ("strongreject", "strongreject_refusal_rate"))

COLUMNS = [("refusal_rate", "HarmBench refusal"), ("strongreject_refusal_rate", "StrongREJECT refusal"),
           ("won_back_harmful", "won back (HB)"), ("won_back_strongreject", "won back (SR)"),
           ("empty_rate", "HarmBench empty"), ("over_refusal_rate", "over-refusal"), ("task_nll", "task NLL"),
           ("utility_kept", "utility kept"), ("task_word_accuracy", "task word acc."), ("perplexity", "perplexity")]


def run_file(cell: str, seed: int) -> str:
    """The file name of one cell and seed's record in ``runs/`` and ``verdicts/``."""
    return f"{cell}-seed{seed}.json"


def seed_summary(runs: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """model -> metric -> {mean, min, max, n} over the runs (the seeds of one cell)."""
    tables = [with_derived(r) for r in runs]
    names = list(dict.fromkeys(n for t in tables for n in t))
    return {n: {k: spread([t[n].get(k) for t in tables if n in t]) for k, _ in COLUMNS} for n in names}


def with_derived(run: Dict) -> Dict[str, Dict[str, float]]:
    """The run's model table with ``won_back_SET`` and ``utility_kept``
    (``mergekit_lssf.measure``) added, against its aligned and fine-tuned
    models."""
    models = run["models"]
    al, ft = models.get("aligned"), models.get("finetuned")
    out = {}
    for name, m in models.items():
        row = dict(m)
        if al and ft:
            for key, column in RATE_COLUMNS:
                values = (m.get(column), al.get(column), ft.get(column))
                row["won_back_" + key] = won_back(*values) if None not in values else None
            values = (m.get("task_nll"), al.get("task_nll"), ft.get("task_nll"))
            row["utility_kept"] = utility_kept(*values) if None not in values else None
        out[name] = row
    return out


def method_models(settings) -> Dict[str, List[str]]:
    """method -> its models in parameter order: each curve of ``curves.CURVES`` with its
    every-seed points, then each seed-0 family (``curves.SEED0_CURVES``) and, for a curve
    with seed-0 points besides (``contrastive``), the curve with them as its own method
    ``CURVE (seed-0 points included)`` (so that the every-seed method compares the same
    points at every seed), then each single point (``curves.RULES`` and the points chosen
    on validation)."""
    def by_curve(seed0: bool) -> Dict[str, List[str]]:
        names: Dict[str, List[str]] = {}
        for p in points(settings, seed0):
            names.setdefault(p.curve, []).append(p.name)
        return names

    every, seed0 = by_curve(False), by_curve(True)
    out = {c: every[c] for c, _ in CURVES if c in every}
    out.update({c: seed0[c] for c, _ in CURVES if c in SEED0_CURVES and c in seed0})
    out.update({f"{c} (seed-0 points included)": seed0[c] for c, _ in CURVES
                if c in every and seed0.get(c, every[c]) != every[c]})
    return {**out, **{r: [r] for r in RULES}, **{method: [model] for model, method in CHOSEN_METHODS.items()}}


def contrasts(runs: List[Verdicts], settings) -> List[Dict]:
    """``paired_contrast`` of each ``lssf-restore-rank{r}`` against its random control
    ``random-restore-rank{r}``, of the package default against interpolation at each
    ``l``, and (issue 47) of ``contrastive-{lam}`` against ``keep-{lam}`` and against
    ``contrastive-benign-{lam}`` at each lam both curves have, of
    ``calibrated-restore-rank{r}`` against ``lssf-restore-rank{r}`` (Eq. 4 against the
    data-free subspace), and of ``contrastive-chosen`` against the other points chosen on
    validation and the default, on both harmful prompt sets, over ``runs`` (one cell's
    seeds). A pair a run lacks is left out."""
    pairs = [(f"lssf-restore-rank{r:g}", f"random-restore-rank{r:g}") for r in settings.ranks]
    pairs += [("lssf-restore", f"interpolate-{l:g}") for l in settings.interpolations]
    pairs += [(f"contrastive-{lam:g}", f"keep-{lam:g}") for lam in settings.contrastive_lams if lam in settings.keep_lams]
    pairs += [(f"contrastive-{lam:g}", f"contrastive-benign-{lam:g}") for lam in settings.contrastive_lams
              if lam in settings.benign_lams]
    pairs += [(f"calibrated-restore-rank{r:g}", f"lssf-restore-rank{r:g}") for r in settings.calibrated_ranks]
    pairs += [("contrastive-chosen", b) for b in ("interpolate-chosen", "lssf-chosen", "lssf-restore", "safe-lora",
                                                   "antidote-chosen", "antidote-update-chosen", "safedelta-chosen",
                                                   "safedelta-exclude0-chosen")]
    rows = []
    for a, b in pairs:
        for key, label in PROMPT_SETS:
            c = paired_contrast(runs, a, b, key)
            if c:
                rows.append({"repair": a, "against": b, "prompts": label, **{k: v for k, v in c.items() if k != "prompts"},
                             "n_prompts": c["prompts"]})
    return rows


def _run_verdicts(out: str, evals: str, every: List[Dict], fresh: set) -> Dict[tuple, Verdicts]:
    """(cell, seed) -> verdicts of each run in ``every``: for the ``fresh`` runs (those
    written now) from the evaluations cached under ``evals``, saved as
    ``out/verdicts/CELL-seedK.json``; for the others, from that file when it exists."""
    found = {}
    for run in every:
        key = (run["cell"], run["seed"])
        path = os.path.join(out, "verdicts", run_file(run["cell"], run["seed"]))
        if key in fresh:
            live = seed_verdicts(evals, *key)
            if live:
                save_verdicts(path, live)
                found[key] = live
            elif os.path.exists(path):
                os.remove(path)  # an earlier build's, not this run's
        elif os.path.exists(path):
            found[key] = load_verdicts(path)
    return found


def _fmt(cell: Dict[str, float], key: str) -> str:
    if cell["n"] == 0:
        return "-"
    digits = 2 if key in ("perplexity", "task_nll") else 3
    if cell["n"] == 1 or cell["min"] == cell["max"]:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} [{cell['min']:.{digits}f}, {cell['max']:.{digits}f}]"


def _table(summary) -> List[str]:
    lines = ["| model | seeds | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, metrics in summary.items():
        seeds = max(m["n"] for m in metrics.values())
        lines.append(f"| {name} | {seeds} | " + " | ".join(_fmt(metrics[k], k) for k, _ in COLUMNS) + " |")
    return lines


def _budget_lines(rows: List[Dict]) -> List[str]:
    """The budget table (``frontier.budget_table`` rows) as markdown: a row per method,
    a column per prompt set and budget."""
    keys = [(label, cost) for _, label in SETS for cost in BUDGETS]
    cell = {(r["method"], r["prompts"], r["budget"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"{label} at cost <= {cost:.0%}" for label, cost in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for m in methods:
        values = []
        for label, cost in keys:
            r = cell.get((m, label, cost))
            ok = r is not None and not math.isnan(r["won_back"])
            values.append(f"{r['won_back']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if ok else "not reached")
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    return lines


def _cell_report(name: str, rs: List[Dict], verdicts: Dict[tuple, Verdicts], settings) -> Dict:
    """Everything the report says about one cell from its runs ``rs`` (its seeds)."""
    methods = method_models(settings)
    by_seed = {r["seed"]: RunArrays(verdicts[(name, r["seed"])], r.get("task_rows") or {}, list(r["models"]))
               for r in rs if (name, r["seed"]) in verdicts}
    # a seed without verdicts, or without those of its ends (aligned, finetuned), has no
    # curve; it is named in the notes
    whole = {seed: a for seed, a in by_seed.items() if "aligned" in a.index and "finetuned" in a.index}
    left_out = [r["seed"] for r in rs if r["seed"] not in whole]
    arrays = list(whole.values())
    return {"left_out": left_out, "note": CELLS[name].note, "dtype": CELLS[name].storage(settings), "seeds": sorted(r["seed"] for r in rs),
            "models": seed_summary(rs),
            "curves": curve_points(arrays, methods) if arrays else {},
            "budgets": budget_table(arrays, methods, singles=SINGLES) if arrays else [],
            "contrasts": contrasts([verdicts[(name, r["seed"])] for r in rs if (name, r["seed"]) in verdicts], settings),
            "choices": {r["seed"]: r.get("choices") or {} for r in rs}}


def write_report(out: str, settings, runs: List[Dict], notes: List[str], timings: Dict[str, float], seconds: float,
                 evals: Optional[str] = None) -> Dict:
    """Write the report files under ``out`` from ``runs`` and every run already kept there;
    ``evals``: the testbed folder whose cached evaluations give the per-prompt verdicts
    of ``runs`` (default ``out``; another when the report is published apart from the
    models). The runs kept from before take theirs from ``out/verdicts/``."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    digests = {cell: settings_digest(settings, cell) for cell in CELLS}
    for run in runs:
        with open(os.path.join(out, "runs", run_file(run["cell"], run["seed"])), "w") as fp:
            json.dump({**run, "settings_digest": digests[run["cell"]]}, fp, indent=1)
    every = []
    for path in glob.glob(os.path.join(out, "runs", "*.json")):
        with open(path) as fp:
            every.append(json.load(fp))
    every = [r for r in every if r["cell"] in CELLS]
    every.sort(key=lambda run: (list(CELLS).index(run["cell"]), run["seed"]))  # main first, as in CELLS
    notes = notes + [f"runs/{run_file(r['cell'], r['seed'])} was built with other settings ({r.get('settings_digest')}; "
                     f"these are {digests[r['cell']]})" for r in every if r.get("settings_digest") != digests[r["cell"]]]
    fresh = {(r["cell"], r["seed"]) for r in runs}
    for r in every:  # a run kept from before may predate curve points added since (settings.CURVE_POINTS)
        lacking = [p.name for p in points(settings, has_seed0_families(r["cell"], r["seed"])) if p.name not in r["models"]]
        if (r["cell"], r["seed"]) not in fresh and lacking:
            notes = notes + [f"runs/{run_file(r['cell'], r['seed'])} has no {', '.join(lacking)} (built before these curve points)"]
    by_cell: Dict[str, List[Dict]] = {}
    for run in every:
        by_cell.setdefault(run["cell"], []).append(run)
    verdicts = _run_verdicts(out, evals or out, every, fresh)
    cells = {name: _cell_report(name, rs, verdicts, settings) for name, rs in by_cell.items()}
    notes = notes + [f"cell {name}, seed {seed}: left out of the curves and the budget table (no per-prompt verdicts "
                     "of it, or of its aligned or finetuned model)" for name, cell in cells.items() for seed in cell["left_out"]]
    choices = {}
    for path in sorted(glob.glob(os.path.join(out, "sweeps", "*", "*.json"))):
        if os.path.basename(path) in ("choice.json", "validation.json"):
            with open(path) as fp:
                choices[os.path.basename(os.path.dirname(path))] = json.load(fp)
    summary = {"settings": asdict(settings), "cells": cells, "sweeps": choices, "notes": notes,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}, "seconds": round(seconds, 1)}
    with open(os.path.join(out, "results.json"), "w") as fp:
        json.dump(summary, fp, indent=1)
    lines = []
    for name, cell in cells.items():
        lines += [f"## cell `{name}`: {cell['note']} ({cell['dtype']}, seeds {cell['seeds']})", ""] + _table(cell["models"]) + [""]
        if len(cell["seeds"]) > 1:
            lines += ["(`unaligned` and `aligned` do not depend on the drift seed: one model each, evaluated once.)", ""]
        if cell["budgets"]:
            lines += [f"Refusal won back at a utility cost of at most {' / '.join(f'{c:.0%}' for c in BUDGETS)} "
                      f"(`curves-{name}.png`): the most along each "
                      "curve, read as straight segments from the fine-tune; a single point only where it lies within the "
                      "budget. Mean over seeds, 95% bootstrap interval over seeds, prompts and task rows:", ""]
            lines += _budget_lines(cell["budgets"]) + [""]
        if cell["contrasts"]:
            lines += ["Paired contrasts: refusal rate of the repair minus the other model, mean over the seeds that have "
                      "both, with a 95% bootstrap interval over prompts (same prompts resampled for both):", "",
                      "| repair | against | prompts | seeds | difference | 95% interval |", "|---|---|---|---|---|---|"]
            for c in cell["contrasts"]:
                lines.append(f"| {c['repair']} | {c['against']} | {c['prompts']} ({c['n_prompts']}) | {c['seeds']} | "
                             f"{c['difference']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] |")
            lines.append("")
        for model, method in CHOSEN_METHODS.items():
            chosen = {seed: c[model] for seed, c in cell["choices"].items() if model in c}
            if chosen:
                said = [f"seed {k}: `{c['chosen']}`" + ("" if any(t["meets"] for t in c["tried"]) else
                                                         " (no candidate kept that much: the first)")
                        for k, c in sorted(chosen.items())]
                lines += [f"{method} (most validation refusal at validation utility kept >= "
                          f"{settings.utility_floor:g}): " + ", ".join(said), ""]
        _plot_curves(out, name, cell)
    lines += [f"- {n}" for n in notes]
    with open(os.path.join(out, "results.md"), "w") as fp:
        fp.write("\n".join(lines) + "\n")
    return summary


def publish_report(out: str, dest: str, settings, runs: List[Dict], notes: List[str]) -> Dict:
    """``write_report`` of ``runs`` into ``dest`` with the paired contrasts read from the
    testbed folder ``out``, plus the JSON records of ``out/sweeps/*/`` (how the training
    settings were chosen). The runs published in ``dest`` before (another session's
    seeds or cells, with their ``verdicts/``) are kept unless ``runs`` replaces them;
    SettingsMismatch, before anything is written, when one of them was built with other
    settings. ``out``'s absolute path is written as ``DIR`` (only the absolute form: a
    short relative name such as ``t`` would also match unrelated text)."""
    replaced = {run_file(r["cell"], r["seed"]) for r in runs}
    for path in sorted(glob.glob(os.path.join(dest, "runs", "*.json"))):
        with open(path) as fp:
            theirs = json.load(fp)
        ours = settings_digest(settings, theirs["cell"])
        if os.path.basename(path) not in replaced and theirs.get("settings_digest") != ours:
            raise SettingsMismatch(f"--publish {dest}: {os.path.relpath(path, dest)} was built with settings "
                             f"{theirs.get('settings_digest')}, these are {ours}; publish elsewhere or remove it")
    for path in sorted(glob.glob(os.path.join(out, "sweeps", "*", "*.json"))):
        folder = os.path.join(dest, "sweeps", os.path.basename(os.path.dirname(path)))
        os.makedirs(folder, exist_ok=True)
        shutil.copy(path, folder)
    summary = write_report(dest, settings, runs, notes, {}, 0.0, evals=out)
    for name in ("results.md", "results.json"):
        with open(os.path.join(dest, name), encoding="utf-8") as fp:
            text = fp.read()
        with open(os.path.join(dest, name), "w", encoding="utf-8") as fp:
            fp.write(text.replace(os.path.abspath(out), "DIR"))
    return summary


def _plot_curves(out: str, name: str, cell: Dict) -> None:
    """``curves-NAME.png``: refusal won back (HarmBench | StrongREJECT) against utility
    kept, each method a line through its points (means over seeds, bars from the
    seeds' min to max), single points as markers, the fine-tune (1, 0) and the aligned
    model (0, 1) as references; the second row zooms on utility kept 0.8 to 1."""
    fig = Figure(figsize=(13, 10))  # no pyplot: no GUI backend, no global figure state
    grid = fig.subplots(2, 2)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label), zoom in [(grid[r][c], SETS[c], r == 1) for r in range(2) for c in range(2)]:
        for i, (method, rows) in enumerate(cell["curves"].items()):
            rows = [r for r in rows if r["u"] and r["w_" + key]]
            if not rows:
                continue
            single = method in SINGLES
            xs = [r["u"]["mean"] for r in rows]
            ys = [r["w_" + key]["mean"] for r in rows]
            xerr = [[x - r["u"]["min"] for x, r in zip(xs, rows)], [r["u"]["max"] - x for x, r in zip(xs, rows)]]
            yerr = [[y - r["w_" + key]["min"] for y, r in zip(ys, rows)], [r["w_" + key]["max"] - y for y, r in zip(ys, rows)]]
            style = dict(color=colours[i % len(colours)], label=method, capsize=2, elinewidth=0.7)
            if single:
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="D" if method in CHOSEN_METHODS.values() else "*", markersize=8, **style)
            else:
                ax.errorbar([1.0] + xs, [0.0] + ys, xerr=[[0] + xerr[0], [0] + xerr[1]], yerr=[[0] + yerr[0], [0] + yerr[1]],
                            fmt="o", markersize=3, linewidth=1,
                            linestyle="--" if method.startswith("random-") or i >= len(colours) else "-", **style)
        ax.scatter([1.0], [0.0], marker="s", color="black", zorder=5)
        ax.scatter([0.0], [1.0], marker="s", color="grey", zorder=5)
        ax.annotate("fine-tune", (1.0, 0.0), fontsize=7, xytext=(-30, -12), textcoords="offset points")
        ax.annotate("aligned", (0.0, 1.0), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("utility kept (task NLL: aligned 0, fine-tune 1)")
        ax.set_ylabel(f"{label} refusal won back (fine-tune 0, aligned 1)")
        ax.set_title(f"cell {name} ({cell['dtype']}): {label}" + (", utility kept 0.8 to 1" if zoom else ""))
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(0.8, 1.01)
    grid[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"curves-{name}.png"), dpi=110)
