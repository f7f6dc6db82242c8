"""``mergekit-lssf tune``'s record (tune.json, its output folder) and what it reads
from its measurements: utility kept and refusal won back per point, the chosen point,
the table and tune.png.

The output folder holds tune's own files only (``OUTPUTS``): ``read_record`` refuses
any other, and tune.json is written atomically (``write_record``). A rerun's settings
are compared with the record's (``check_same_settings``).

``derived`` adds to every model of a tune.json record (the fine-tune, the aligned
model, each point): ``refusal_pooled`` (every harmful prompt of every set),
``won_back`` (``measure.won_back`` on them) and ``utility_kept``
(``measure.utility_kept`` of the task NLL), and per family the refusal won back at
the budget (``measure.at_budget``). ``choose`` applies the rule on the half of the
harmful prompts kept for choosing and reports on the other half.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from mergekit_lssf.measure import at_budget, utility_kept, won_back
from mergekit_lssf.parameters import LSSFConfigError

#: Utility kept is compared with 1 - budget up to this (float noise of the NLL ratio).
TOLERANCE = 1e-9

FORMAT = "mergekit-lssf tune 1"
#: Every file tune writes in --out; nothing else may be there.
OUTPUTS = ("tune.json", "tune.png", "recipe.yml", "contrastive.safetensors")
CALIBRATION = "contrastive.safetensors"


#: tune's temporary files: ``.tune-PID.json|yml|png`` (written, then renamed into
#: place), ``.tune-probe-PID`` (the --out write probe) and the contrastive
#: calibration's ``contrastive.safetensors.partial``; its parts folder
#: (``safetensors_io.StreamedWriter``) is ``PARTS`` holding ``PART`` files only.
TEMPORARY = re.compile(r"\.tune-\d+\.(json|yml|png)|\.tune-probe-\d+|" + re.escape(CALIBRATION) + r"\.partial")
PARTS, PART = re.compile(r"\.lssf-parts-[A-Za-z0-9_]{8}"), re.compile(r"part-\d{5}\.safetensors")


def _owned(out_dir: str, name: str) -> bool:
    """A file tune writes in --out (a plain file of that name), one of its temporary
    files, or a calibration parts folder holding nothing but its part files."""
    path = os.path.join(out_dir, name)
    if os.path.islink(path):
        return False
    if PARTS.fullmatch(name):
        return os.path.isdir(path) and all(PART.fullmatch(n) and os.path.isfile(os.path.join(path, n))
                                           for n in os.listdir(path))
    return (name in OUTPUTS or TEMPORARY.fullmatch(name) is not None) and os.path.isfile(path)


#: What a tune.json must hold to be resumed.
RECORD_KEYS = {"settings": dict, "references": dict, "points": list, "halves": dict}


def read_record(out_dir: str) -> dict[str, Any] | None:
    """The tune.json tune wrote in ``out_dir`` (None: none there). Files tune did not
    write, or tune's file names without its tune.json, are refused."""
    if not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise LSSFConfigError(f"--out: {out_dir} is a file, not a folder")
    names = sorted(os.listdir(out_dir))
    foreign = [n for n in names if not _owned(out_dir, n)]
    path = os.path.join(out_dir, "tune.json")
    record = None
    if "tune.json" not in foreign and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fp:
                record = json.load(fp)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            foreign.insert(0, "tune.json")
            record = None
    visible = [n for n in names if n in OUTPUTS and n != "tune.json" and n not in foreign]
    if record is None and visible and "tune.json" not in foreign:
        foreign += visible
    if foreign:
        shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign)} files)" if len(foreign) > 6 else "")
        raise LSSFConfigError(f"--out: {out_dir} holds files tune did not write ({shown}); choose an empty or new "
                              "folder (nothing was written or deleted)")
    return record


def check_record(out_dir: str, record: dict[str, Any]) -> None:
    """A tune.json to resume holds what tune reads of it (one line naming what is not)."""
    for key, kind in RECORD_KEYS.items():
        if not isinstance(record.get(key), kind):
            raise LSSFConfigError(f"{out_dir}/tune.json is incomplete or damaged (no `{key}`); add --restart to start "
                                  "afresh (it replaces tune's own files there)")
    if not all(isinstance(p, dict) and isinstance(p.get("key"), str) for p in record["points"]):
        raise LSSFConfigError(f"{out_dir}/tune.json is incomplete or damaged (a point without its `key`); add "
                              "--restart to start afresh (it replaces tune's own files there)")


def clear_own_files(out_dir: str) -> None:
    """Remove tune's own files from ``out_dir`` (``--restart``), and nothing else."""
    for name in os.listdir(out_dir):
        if not _owned(out_dir, name):
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            for inner in os.listdir(path):
                os.remove(os.path.join(path, inner))
            os.rmdir(path)
        else:
            os.remove(path)


def probe_writable(out_dir: str) -> None:
    """Refuse (one line) an --out tune cannot write in, before anything is measured:
    a probe file is written there and removed, with any folder made for it."""
    made, folder = [], os.path.abspath(out_dir)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    probe = os.path.join(out_dir, f".tune-probe-{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as fp:
            fp.write("probe")
        os.remove(probe)
    except OSError as error:
        raise LSSFConfigError(f"--out: cannot write in {out_dir} ({error.strerror or error}); nothing was "
                              "measured") from None
    finally:
        for path in made:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)


def write_record(out_dir: str, record: dict[str, Any]) -> None:
    """tune.json, atomically (a temporary file renamed into place)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".tune-{os.getpid()}.json")
    with open(tmp, "w", encoding="utf-8") as fp:
        json.dump(_plain(record), fp, indent=1, allow_nan=False)
    os.replace(tmp, os.path.join(out_dir, "tune.json"))


def _plain(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: How each setting is named when a rerun differs.
SETTING_WORDS = {
    "recipe": "the recipe", "models": "the models' weights (fingerprints)", "task": "the task data",
    "measurement_rows": "the task rows measured", "families": "--families", "grids": "the grids (--points, --grid)",
    "max_prompts": "--max-prompts", "batch_size": "--batch-size", "max_new_tokens": "--max-new-tokens",
    "device": "--device", "prompts": "the prompt sets",
    "files": "a file the recipe names (`subspace:`, `calibration:`)",
    "versions": "the versions of mergekit-lssf, mergekit, torch or transformers",
}


def differing_setting(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first setting of ``new`` that ``old`` (a tune.json's) does not share."""
    for key in SETTING_WORDS:
        if old.get(key) != new.get(key):
            return key
    return None


def check_same_settings(out_dir: str, record: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to go on in ``out_dir`` with settings other than its tune.json's, naming
    the first that differs."""
    key = differing_setting(record.get("settings", {}), settings)
    if key is not None:
        raise LSSFConfigError(
            f"{out_dir}/tune.json was made with other settings: {SETTING_WORDS[key]} differs (was "
            f"{_short(record.get('settings', {}).get(key))}, now {_short(settings.get(key))}); rerun with the same "
            "settings to resume, or add --restart to start afresh (it replaces tune's own files there)")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def pooled(state: dict[str, Any]) -> list[int]:
    """The 0/1 refusals of every harmful prompt, set after set (tune.json's order)."""
    return [flag for flags in state["refused"].values() for flag in flags]


def rate(state: dict[str, Any], indices: list[int] | None = None) -> float:
    flags = pooled(state)
    picked = flags if indices is None else [flags[i] for i in indices]
    return sum(picked) / len(picked)


def derived(record: dict[str, Any], budget: float) -> dict[str, Any]:
    """Adds ``refusal_pooled``, ``won_back`` and ``utility_kept`` to every model of
    ``record``; returns ``{"at_budget": {family: won back}}``."""
    ft, al = record["references"]["finetuned"], record["references"]["aligned"]
    for state in [ft, al] + record["points"]:
        state["refusal_pooled"] = rate(state)
        state["won_back"] = _finite(won_back(rate(state), rate(al), rate(ft)))
        state["utility_kept"] = _finite(utility_kept(state["task_nll"], al["task_nll"], ft["task_nll"]))
    curves: dict[str, list] = {}
    for point in record["points"]:
        curves.setdefault(point["family"], []).append(
            (point["utility_kept"] if point["utility_kept"] is not None else math.nan,
             point["won_back"] if point["won_back"] is not None else math.nan))
    return {"at_budget": {family: _finite(at_budget(curve, budget)) for family, curve in curves.items()}}


def choose(record: dict[str, Any], budget: float) -> tuple[dict[str, Any] | None, str]:
    """``(chosen, message)``: the point that wins back the most refusal on the choosing
    half with utility kept >= 1 - budget (ties: the higher utility kept, then the
    earlier point), reported on the other half; None and a one-line reason when no
    point wins anything back."""
    ft, al = record["references"]["finetuned"], record["references"]["aligned"]
    half, other = record["halves"]["choose"], record["halves"]["report"]
    if not rate(al, half) > rate(ft, half):
        return None, (f"tune: no recipe: the aligned model refuses no more than the fine-tune on the harmful prompts "
                      f"tune chooses on ({rate(al, half):.2f} against {rate(ft, half):.2f}), so there is no lost "
                      "refusal to win back; no recipe.yml written")
    floor = 1 - budget
    best = None
    for order, point in enumerate(record["points"]):
        kept = point["utility_kept"]
        gained = won_back(rate(point, half), rate(al, half), rate(ft, half))
        if kept is None or kept < floor - TOLERANCE or not gained > 0:
            continue
        rank = (gained, kept, -order)
        if best is None or rank > best[0]:
            best = (rank, point)
    if best is None:
        return None, (f"tune: no recipe: no point won back any refusal with utility kept >= {floor:g} (budget "
                      f"{budget:g}) on the harmful prompts tune chooses on; no recipe.yml written")
    (gained, kept, _order), point = best
    reported = _finite(won_back(rate(point, other), rate(al, other), rate(ft, other)))
    chosen = {"key": point["key"], "family": point["family"], "parameter": point["parameter"],
              "value": point["value"], "utility_kept": kept, "won_back_choosing_half": gained,
              "won_back_reported_half": reported, "refusal_reported_half": rate(point, other),
              "prompts_choosing_half": len(half), "prompts_reported_half": len(other)}
    shown = f"{reported:.2f}" if reported is not None else "undefined (the aligned model refuses no more there)"
    return chosen, (f"tune: chose {point['key']}: refusal won back {shown} on the {len(other)} held-out harmful "
                    f"prompts ({gained:.2f} on the {len(half)} it was chosen on), utility kept {kept:.3f}; "
                    "wrote recipe.yml")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(record: dict[str, Any]) -> str:
    """One row per model: refusal per set, won back, empty answers, over-refusal, task
    NLL, utility kept, perplexity and the refusal interval; the chosen point starred."""
    refs = record["references"]
    sets = list(refs["finetuned"]["refused"])
    chosen = (record.get("chosen") or {}).get("key")
    rows = [("fine-tune", refs["finetuned"]), ("aligned", refs["aligned"])]
    rows += [(("* " if p["key"] == chosen else "") + p["key"], p) for p in record["points"]]
    width = max(len(name) for name, _ in rows)
    head = f"{'model':{width}s}  " + "  ".join(f"{s:>11s}" for s in sets)
    head += "  won back  empty  over-refusal  task NLL  utility kept  perplexity  refusal 95% interval"
    lines = [head]
    for name, state in rows:
        spread = state["spread"][sets[0]]
        lines.append(
            f"{name:{width}s}  " + "  ".join(f"{state['refusal'][s]:11.3f}" for s in sets)
            + f"  {_fmt(state.get('won_back'), '8.2f'):>8s}  {state['empty'][sets[0]]:5.2f}"
            + f"  {state['over_refusal']:12.3f}  {state['task_nll']:8.4f}  {_fmt(state.get('utility_kept'), '12.4f'):>12s}"
            + f"  {state['perplexity']:10.2f}  {sets[0]} [{spread[0]:.2f}, {spread[1]:.2f}]")
    return "\n".join(lines)


def summary_lines(record: dict[str, Any], budget: float) -> list[str]:
    """Refusal won back at the budget, per family (on every harmful prompt)."""
    at = record.get("derived", {}).get("at_budget", {})
    return [f"{family}: refusal won back at the budget ({budget:g} of the task): {_fmt(value, '.2f')}"
            for family, value in at.items()]


def plot(record: dict[str, Any], budget: float, path: str) -> None:
    """tune.png: refusal won back (or the refusal rate, when the fine-tune lost none)
    against utility kept, one line per family from the fine-tune out, the budget line
    and the chosen point; a second panel for over-refusal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = record["references"]
    ft, al = refs["finetuned"], refs["aligned"]
    use_rate = ft.get("won_back") is None
    y_of = (lambda s: s["refusal_pooled"]) if use_rate else (lambda s: s["won_back"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    families: dict[str, list] = {}
    for point in record["points"]:
        families.setdefault(point["family"], []).append(point)
    for axis, value, label in ((left, y_of, "refusal rate" if use_rate else "refusal won back"),
                               (right, lambda s: s["over_refusal"], "over-refusal (benign prompts)")):
        for family, points in families.items():
            xs = [1.0] + [p["utility_kept"] if p["utility_kept"] is not None else math.nan for p in points]
            ys = [value(ft)] + [value(p) for p in points]
            axis.plot(xs, ys, marker="o", label=family)
        axis.plot([1.0], [value(ft)], "ks", label="fine-tune")
        axis.plot([0.0], [value(al)], "k^", label="aligned")
        axis.axvline(1 - budget, color="grey", linestyle="--", label=f"budget: utility kept {1 - budget:g}")
        chosen = record.get("chosen")
        if chosen:
            point = next(p for p in record["points"] if p["key"] == chosen["key"])
            axis.plot([point["utility_kept"]], [value(point)], "r*", markersize=16, label=f"chosen: {chosen['key']}")
        axis.set_xlabel("utility kept (1 = the fine-tune's task NLL, 0 = the aligned model's)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.set_title("refusal on held-out harmful prompts")
    right.set_title("over-refusal")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["CALIBRATION", "FORMAT", "OUTPUTS", "SETTING_WORDS", "check_record", "check_same_settings", "choose",
           "clear_own_files", "derived", "differing_setting", "plot", "probe_writable", "read_record", "summary_lines",
           "table", "write_record"]
