"""results.json, results.md, safety_vs_utility.png and diagnostics.png.

Every cell-and-seed run is kept as ``DIR/runs/CELL-seedK.json`` (with the digest of
the settings it was built with) and its per-prompt refusal verdicts as
``DIR/verdicts/CELL-seedK.json``; the report is rebuilt from all of them, so cells and
seeds built in separate invocations, or sessions publishing into the same folder, add
up. The main cell's seeds are summarised per model as mean and [min, max].
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from .settings import CELLS, SettingsMismatch, settings_digest
from .verdicts import PROMPT_SETS, Verdicts, paired_contrast, seed_verdicts
from .verdicts import load as load_verdicts
from .verdicts import save as save_verdicts

COLUMNS = [("refusal_rate", "HarmBench refusal"), ("strongreject_refusal_rate", "StrongREJECT refusal"),
           ("empty_rate", "HarmBench empty"), ("strongreject_empty_rate", "StrongREJECT empty"),
           ("over_refusal_rate", "over-refusal"), ("task_accuracy", "task acc."),
           ("perplexity", "perplexity"), ("refusal_score", "refusal score (nats)"),
           ("direction_recovery", "refusal-direction recovery")]


def _spread(values: List[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def seed_summary(runs: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """model -> metric -> {mean, min, max, n} over the runs (the seeds of one cell)."""
    names = list(dict.fromkeys(n for r in runs for n in r["models"]))
    return {n: {k: _spread([r["models"][n].get(k) for r in runs if n in r["models"]]) for k, _ in COLUMNS} for n in names}


# (repair, what it is compared with): each repair against its random controls of the same
# rank and norm, and against the fine-tune it repairs; the delta-independent controls
# against the fine-tune too (a null control should not differ from it)
CONTRASTS = [("lssf", "random-subspace"), ("lssf-restore", "random-restore"),
             ("lssf-noise-floor-restore", "random-noise-floor-restore"), ("lssf", "random-spectrum"),
             ("lssf-restore", "random-spectrum-restore"), ("lssf", "finetuned"),
             ("lssf-restore", "finetuned"), ("lssf-noise-floor-restore", "finetuned"), ("lssf-alpha0.5", "finetuned"),
             ("random-spectrum", "finetuned"), ("random-spectrum-restore", "finetuned")]
MARKERS = (("finetuned", "s"), ("aligned", "*"), ("task-arithmetic", "^"), ("patch-reapplied", "P"),
           ("lssf-calibrated", "<"), ("lssf-noise-floor", "v"), ("lssf-restore", "D"), ("lssf-noise-floor-restore", "h"),
           ("random-subspace", "o"), ("random-restore", "D"), ("random-noise-floor-restore", "h"), ("random-spectrum", "p"),
           ("random-spectrum-restore", "d"))
def contrasts(runs: List[Verdicts]) -> List[Dict]:
    """``paired_contrast`` of every CONTRASTS pair on both harmful prompt sets, over
    ``runs`` (one cell's seeds, their verdicts each)."""
    rows = []
    for a, b in CONTRASTS:
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
        path = os.path.join(out, "verdicts", f"{run['cell']}-seed{run['seed']}.json")
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
    digits = 2 if key in ("perplexity", "refusal_score") else 3
    if cell["n"] == 1 or cell["min"] == cell["max"]:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} [{cell['min']:.{digits}f}, {cell['max']:.{digits}f}]"


def _table(summary) -> List[str]:
    lines = ["| model | seeds | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, metrics in summary.items():
        seeds = max(m["n"] for m in metrics.values())
        lines.append(f"| {name} | {seeds} | " + " | ".join(_fmt(metrics[k], k) for k, _ in COLUMNS) + " |")
    return lines


def write_report(out: str, settings, runs: List[Dict], notes: List[str], timings: Dict[str, float], seconds: float,
                 evals: Optional[str] = None) -> Dict:
    """Write the report files under ``out`` from ``runs`` and every run already kept there;
    ``evals``: the testbed folder whose cached evaluations give the paired contrasts of
    ``runs`` (default ``out``; another when the report is published apart from the
    models). The runs kept from before take theirs from ``out/verdicts/``."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    digests = {cell: settings_digest(settings, cell) for cell in CELLS}
    for run in runs:
        with open(os.path.join(out, "runs", f"{run['cell']}-seed{run['seed']}.json"), "w") as fp:
            json.dump({**run, "settings_digest": digests[run["cell"]]}, fp, indent=2)
    every = []
    for path in glob.glob(os.path.join(out, "runs", "*.json")):
        with open(path) as fp:
            every.append(json.load(fp))
    every.sort(key=lambda run: (list(CELLS).index(run["cell"]), run["seed"]))  # main first, as in CELLS
    notes = notes + [f"runs/{r['cell']}-seed{r['seed']}.json was built with other settings ({r.get('settings_digest')}; "
                     f"these are {digests[r['cell']]})" for r in every if r.get("settings_digest") != digests[r["cell"]]]
    by_cell: Dict[str, List[Dict]] = {}
    for run in every:
        by_cell.setdefault(run["cell"], []).append(run)
    verdicts = _run_verdicts(out, evals or out, every, {(r["cell"], r["seed"]) for r in runs})
    cells = {name: {"note": CELLS[name].note, "seeds": sorted(r["seed"] for r in rs), "models": seed_summary(rs),
                    "contrasts": contrasts([verdicts[(name, r["seed"])] for r in rs if (name, r["seed"]) in verdicts]),
                    "diagnostics": next((r.get("diagnostics") for r in rs if r["seed"] == 0), None)}
             for name, rs in by_cell.items()}
    choices = {}
    for name in ("align/choice.json", "align-full/validation.json", "drift-lora/choice.json", "drift-full/choice.json"):
        path = os.path.join(out, "sweeps", name)
        if os.path.exists(path):
            with open(path) as fp:
                choices[name.split("/")[0]] = json.load(fp)
    summary = {"settings": asdict(settings), "cells": cells, "sweeps": choices, "notes": notes,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}, "seconds": round(seconds, 1)}
    with open(os.path.join(out, "results.json"), "w") as fp:
        json.dump(summary, fp, indent=2)
    lines = []
    for name, cell in cells.items():
        lines += [f"## cell `{name}`: {cell['note']} (seeds {cell['seeds']})", ""] + _table(cell["models"]) + [""]
        if len(cell["seeds"]) > 1:
            lines += ["(`unaligned` and `aligned` do not depend on the drift seed: one model each, evaluated once; "
                      "only their refusal-direction recovery, measured against each seed's fine-tune, varies.)", ""]
        if cell["contrasts"]:
            lines += ["Paired contrasts: refusal rate of the repair minus the other model, mean over the seeds that have "
                      "both, with a 95% bootstrap interval over prompts (same prompts resampled for both):", "",
                      "| repair | against | prompts | seeds | difference | 95% interval |", "|---|---|---|---|---|---|"]
            for c in cell["contrasts"]:
                lines.append(f"| {c['repair']} | {c['against']} | {c['prompts']} ({c['n_prompts']}) | {c['seeds']} | "
                             f"{c['difference']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] |")
            lines.append("")
        diag = cell["diagnostics"]
        if diag:
            lines += ["Diagnostics per module (means over layers): energy of delta above the noise floor, ranks, "
                      "drift overlap with the safety subspace vs random, cosine(drift, delta):", "",
                      "| module | energy above noise | noise-floor rank | entropy rank | drift overlap | random | cos(drift, delta) |",
                      "|---|---|---|---|---|---|---|"]
            for module, d in diag["per_module"].items():
                lines.append(f"| {module} | {d['energy_above_noise']:.3f} | {d['noise_floor_rank']:.1f} | {d['entropy_rank']:.1f} | "
                             f"{d['drift_overlap']:.3f} | {d['random_overlap']:.3f} | {d['drift_delta_cosine']:+.3f} |")
            lines.append("")
    lines += [f"- {n}" for n in notes]
    with open(os.path.join(out, "results.md"), "w") as fp:
        fp.write("\n".join(lines) + "\n")
    _plot_safety(out, cells)
    _plot_diagnostics(out, cells, by_cell)
    return summary


def publish_report(out: str, dest: str, settings, runs: List[Dict], notes: List[str]) -> Dict:
    """``write_report`` of ``runs`` into ``dest`` with the paired contrasts read from the
    testbed folder ``out``, plus the JSON records of ``out/sweeps/*/`` (how the training
    settings were chosen). The runs published in ``dest`` before (another session's
    seeds or cells, with their ``verdicts/``) are kept unless ``runs`` replaces them;
    SettingsMismatch, before anything is written, when one of them was built with other
    settings. ``out``'s absolute path is written as ``DIR`` (only the absolute form: a
    short relative name such as ``t`` would also match unrelated text)."""
    import shutil

    replaced = {f"{r['cell']}-seed{r['seed']}.json" for r in runs}
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


def _plot_safety(out: str, cells: Dict) -> None:
    """Refusal (HarmBench, StrongREJECT) against perplexity: each cell's alpha sweep as a
    labelled curve, the other models as markers; one legend for the cells' colours and one
    for the models' markers (hollow = random control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    keys = [("refusal_rate", "HarmBench test refusal"), ("strongreject_refusal_rate", "StrongREJECT refusal")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    one = len(cells) == 1  # one cell: a colour per model; several: a colour per cell
    model_colour = lambda j, i: colours[(j + 1) % len(colours)] if one else colours[i % len(colours)]  # noqa: E731
    for ax, (key, label) in zip(axes, keys):
        for i, (name, cell) in enumerate(cells.items()):
            m = cell["models"]
            colour = colours[i % len(colours)]
            point = lambda n: (m[n]["perplexity"]["mean"], m[n][key]["mean"])  # noqa: E731
            sweep = sorted((float(n.removeprefix("lssf-alpha")), n) for n in m if n.startswith("lssf-alpha"))
            sweep = sorted(sweep + ([(1.0, "lssf")] if "lssf" in m else []))
            if sweep:
                xs, ys = zip(*[point(n) for _, n in sweep])
                ax.plot(xs, ys, "-o", color=colour, markersize=3, linewidth=1)
                for (a, n) in sweep:
                    ax.annotate(f"{a:g}", point(n), fontsize=6, color=colour, xytext=(2, 2), textcoords="offset points")
            for j, (n, marker) in enumerate(MARKERS):
                if n in m:
                    c = model_colour(j, i)
                    ax.scatter(*point(n), marker=marker, s=45, facecolors="none" if n.startswith("random-") else c, edgecolors=c)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (benign text, log scale)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label} vs utility")
    present = [(j, n, marker) for j, (n, marker) in enumerate(MARKERS) if any(n in c["models"] for c in cells.values())]
    grey = lambda j: model_colour(j, 0) if one else "0.35"  # noqa: E731
    models = [Line2D([], [], linestyle="", marker=marker, markersize=7, label=n, markeredgecolor=grey(j),
                     markerfacecolor="none" if n.startswith("random-") else grey(j)) for j, n, marker in present]
    curves = [Line2D([], [], color=colours[i % len(colours)], marker="o", markersize=3, label=f"{name}: lssf alpha sweep")
              for i, name in enumerate(cells)]
    axes[1].legend(handles=curves, title="cell (colour); labels = alpha", fontsize=7, title_fontsize=7,
                   loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.legend(handles=models, title="model (marker); hollow = random control", fontsize=7, title_fontsize=7,
               loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(os.path.join(out, "safety_vs_utility.png"), dpi=110)
    plt.close(fig)


def _plot_diagnostics(out: str, cells: Dict, by_cell: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, cell in cells.items():
        diag = cell["diagnostics"]
        if not diag:
            continue
        layers = [(int(k), v) for k, v in diag["per_layer"].items() if k not in ("None",)]
        layers.sort()
        xs = [k for k, _ in layers]
        axes[0].plot(xs, [v["drift_overlap"] / v["random_overlap"] if v["random_overlap"] else float("nan") for _, v in layers], label=name)
        axes[1].plot(xs, [v["drift_delta_cosine"] for _, v in layers], label=name)
        run = next(r for r in by_cell[name] if r["seed"] == 0)
        p = run["projections"]
        if "aligned" in p and "finetuned" in p:
            for model, style in (("aligned", "-"), ("finetuned", "--"), ("lssf", ":"), ("lssf-restore", "-.")):
                if model in p:
                    axes[2].plot(range(len(p[model])), p[model], style, label=f"{name}: {model}")
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set_title("drift overlap with safety subspace / random")
    axes[1].axhline(0.0, color="grey", linewidth=0.8)
    axes[1].set_title("cosine(drift, delta) per layer")
    axes[2].set_title("harmful-benign gap along the refusal direction")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "diagnostics.png"), dpi=110)
    plt.close(fig)
