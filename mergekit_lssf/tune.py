"""``mergekit-lssf tune``: the safety-utility curve of a recipe's repairs on the user's
own task, and the recipe it picks (issue 48).

Every point (``tune_points``) is put into one resident copy of the fine-tune, measured
with the package's measures (``measure.py``) and taken out again:

* refusal on the shipped HarmBench ``test`` prompts (and StrongREJECT where shipped;
  never the ``anchor`` split, which calibration reads), empty answers, over-refusal
  on the shipped benign ``test`` prompts, each set capped at ``max_prompts``;
* task NLL on the measurement rows of TASK (all of them, or, when the ``contrastive``
  family runs, the half that ``measure.split_halves`` does not give the calibration),
  utility kept against the fine-tune and the aligned model, perplexity on shipped prose;
* the bootstrap interval of each refusal rate over its prompts.

The fine-tune and the aligned model are measured too (the aligned model from its own
folder, as ``eval`` would). The chosen point wins back the most refusal with utility
kept >= 1 - budget (ties: the lower task cost), chosen on one half of the harmful
prompts and reported on the other (``tune_report.choose``). ``tune.json`` is written
atomically after every point, so a rerun into the same folder resumes and Ctrl-C
loses at most the point being measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from tqdm import tqdm

from mergekit_lssf import evaluate as ev
from mergekit_lssf.calibrate import Anchor, anchors_sha256
from mergekit_lssf.contrastive_calibrate import (
    contrastive_calibrate,
    load_task,
    recipe_models,
)
from mergekit_lssf.generation import generate, load_model
from mergekit_lssf.measure import (
    bootstrap_interval,
    empty_rate,
    is_refusal,
    perplexity,
    pooled_nll,
    row_nll,
    split_halves,
)
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.provenance import versions
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.subspace_file import model_fingerprint
from mergekit_lssf.tune_points import (
    FAMILIES,
    Point,
    Resident,
    check_grid_value,
    contrastive_doc,
    default_grid,
    interpolation_tensors,
    lssf_tensors,
    lssf_terms,
    point_recipe,
    recipe_doc,
    recipe_text,
    swept_parameter,
)
from mergekit_lssf.tune_report import (
    CALIBRATION,
    FORMAT,
    check_same_settings,
    choose,
    clear_own_files,
    derived,
    plot,
    read_record,
    summary_lines,
    table,
    write_record,
)

#: Fewer measurement rows than this draw a warning: utility kept is noisy.
MIN_MEASUREMENT_ROWS = 8


@dataclass(frozen=True)
class TuneOptions:
    """The command's options (defaults as documented in ``--help``)."""

    budget: float = 0.01
    points: int = 5
    families: tuple[str, ...] = ("lssf", "interpolation")
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    max_prompts: int = 64
    batch_size: int = 24
    max_new_tokens: int = 32
    device: str = "cpu"
    lora_merge_cache: str | None = None
    restart: bool = False
    progress: bool = True


def check_options(opts: TuneOptions) -> None:
    """The numbers and names of ``opts``, one line each, before anything runs."""
    if not 0 < opts.budget < 1:
        raise LSSFConfigError(f"--budget must satisfy 0 < budget < 1 (the share of the task the repair may cost), "
                              f"got {opts.budget:g}")
    if opts.points < 2:
        raise LSSFConfigError(f"--points must be at least 2 (points per family), got {opts.points}")
    if not opts.families or set(opts.families) - set(FAMILIES) or len(set(opts.families)) != len(opts.families):
        raise LSSFConfigError(f"--families must name some of {', '.join(FAMILIES)} once each, got "
                              f"{','.join(opts.families) or 'none'}")
    for family in opts.grids:
        if family not in opts.families:
            raise LSSFConfigError(f"--grid {family}=...: {family} is not one of --families ({','.join(opts.families)})")
    for name, least in (("max_prompts", 2), ("batch_size", 1), ("max_new_tokens", 1)):
        if getattr(opts, name) < least:
            raise LSSFConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(opts, name)}"
                                  + (" (tune chooses on one half of the prompts and reports on the other)"
                                     if name == "max_prompts" else ""))


def parse_grids(values) -> dict[str, tuple[float, ...]]:
    """``--grid FAMILY=V,V,...`` options as ``{family: values}``."""
    grids: dict[str, tuple[float, ...]] = {}
    for text in values:
        family, _, numbers = text.partition("=")
        try:
            grid = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            grid = ()
        if family not in FAMILIES or not grid or family in grids:
            raise LSSFConfigError(f"--grid {text!r}: expected FAMILY=V,V,... once per family, FAMILY one of "
                                  f"{', '.join(FAMILIES)}")
        grids[family] = grid
    return grids


def family_points(opts: TuneOptions, fusion: str) -> list[Point]:
    """Every point, family by family, each family from its mildest repair to its strongest."""
    points = []
    for family in opts.families:
        parameter = swept_parameter(family, fusion)
        grid = opts.grids.get(family) or default_grid(parameter, opts.points)
        for value in grid:
            problem = check_grid_value(parameter, value, "contrastive" if family == "contrastive" else fusion)
            if problem:
                raise LSSFConfigError(f"--grid {family}: {value:g}: {problem}")
            points.append(Point(family, parameter, float(value)))
    return points


# ---------------------------------------------------------------- prompts and task rows


def capped(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced (all of them when there are few)."""
    return list(items) if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def harmful_sets(max_prompts: int) -> dict[str, list[str]]:
    """The held-out harmful prompt sets: HarmBench ``test``, and StrongREJECT's ``test``
    split when the package ships one; each capped at ``max_prompts``."""
    sets = {"harmbench": capped(ev.harmbench_prompts("test"), max_prompts)}
    shipped = resources.files("mergekit_lssf").joinpath("data/strongreject/prompts.jsonl")
    if shipped.is_file():
        rows = [json.loads(line) for line in shipped.read_text("utf-8").splitlines() if line.strip()]
        prompts = [r["prompt"] for r in rows if r.get("split", "test") == "test"]
        if prompts:
            sets["strongreject"] = capped(prompts, max_prompts)
    return sets


def task_split(count: int, calibrating: bool) -> tuple[list[int], list[int]]:
    """``(calibration rows, measurement rows)`` of TASK: without a data-aware family
    every row is measured; with one, ``split_halves`` (seed 0) gives the calibration
    the first half and the measurement the other."""
    if not calibrating:
        return [], list(range(count))
    if count < 2:
        raise LSSFConfigError("the contrastive family needs at least 2 task rows (half calibrate, half measure)")
    return split_halves(range(count), seed=0)


# ---------------------------------------------------------------- measuring one model


def measure_state(model, tokenizer, harmful: dict[str, list[str]], benign: list[str], rows: list[dict],
                  opts: TuneOptions, per_row=None) -> dict[str, Any]:
    """Every measure of the model as it is now (``per_row``: its task ``row_nll``,
    when already computed)."""
    started = time.perf_counter()
    per_row = per_row if per_row is not None else row_nll(model, tokenizer, rows, batch=opts.batch_size)
    out: dict[str, Any] = {"task_nll": pooled_nll(per_row), "task_rows": [list(r) for r in per_row],
                           "refused": {}, "refusal": {}, "empty": {}, "spread": {}}
    for name, prompts in harmful.items():
        answers = generate(model, tokenizer, prompts, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                           progress=opts.progress, desc=f"{name} prompts")
        refused = [int(is_refusal(a)) for a in answers]
        out["refused"][name] = refused
        out["refusal"][name] = sum(refused) / len(refused)
        out["empty"][name] = empty_rate(answers)
        out["spread"][name] = list(bootstrap_interval(refused))
    answers = generate(model, tokenizer, benign, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                       progress=opts.progress, desc="benign prompts")
    out["over_refusal"] = sum(map(is_refusal, answers)) / len(answers)
    out["perplexity"] = perplexity(model, tokenizer, ev.benign_text())
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


# ---------------------------------------------------------------- the command


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak memory so far: torch's allocator on a GPU, the process's RSS on the CPU."""
    if device.type == "cuda":
        return {"mib": round(torch.cuda.max_memory_allocated(device) / 2**20), "what": "GPU (torch.cuda.max_memory_allocated)"}
    return {"mib": round(_rss_mib()), "what": "process resident set (ru_maxrss)"}


def tune(recipe_path: str, task_path: str, out_dir: str, opts: TuneOptions,
         echo: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``tune`` (see the module's doc); returns tune.json's content."""
    check_options(opts)
    plan = plan_recipe(load_recipe(recipe_path), lora_merge_cache=opts.lora_merge_cache)
    points = family_points(opts, plan.parameters()["fusion"])
    task = load_task(task_path)
    rows = [{"prompt": r.prompt, "answer": r.response} for r in task]
    calibration_rows, measured_rows = task_split(len(rows), "contrastive" in opts.families)
    if len(measured_rows) < MIN_MEASUREMENT_ROWS:
        warn(f"tune: warning: utility is measured on {len(measured_rows)} task rows (fewer than "
             f"{MIN_MEASUREMENT_ROWS}): utility kept is noisy")
    roles = recipe_models(load_recipe(recipe_path), opts.lora_merge_cache)  # plan.config is planned (rewritten)
    doc = recipe_doc(recipe_path, plan)
    harmful, benign = harmful_sets(opts.max_prompts), capped(ev.benign_prompts("test"), opts.max_prompts)
    device = torch.device(opts.device)
    unaligned = plan.refs.get("unaligned")
    settings = {
        "recipe": _sha256(recipe_text(doc)),
        "models": {**roles.lineage(), "aligned": model_fingerprint(roles.aligned),
                   **({"unaligned": model_fingerprint(unaligned.model.path)}
                      if unaligned is not None and os.path.isdir(unaligned.model.path) else {})},
        "task": anchors_sha256(task), "task_rows": len(rows), "measurement_rows": measured_rows,
        "families": list(opts.families), "grids": {f: [p.value for p in points if p.family == f] for f in opts.families},
        "max_prompts": opts.max_prompts, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens,
        "device": device.type, "prompts": {**{k: len(v) for k, v in harmful.items()}, "benign": len(benign)},
    }
    record, restarting = _resumed(out_dir, settings, opts.restart, echo)
    if record is None:
        choose_half, report_half = split_halves([p for prompts in harmful.values() for p in prompts], seed=0)
        record = {"format": FORMAT, "settings": settings, "recipe_file": recipe_path, "task_file": task_path,
                  "halves": {"choose": choose_half, "report": report_half}, "references": {}, "points": []}
    record["versions"], record["budget"] = versions(), opts.budget
    started = time.perf_counter()
    sets = (harmful, benign, [rows[i] for i in measured_rows])
    model, tokenizer = _references(record, roles, sets, opts, task_path)
    if restarting:
        clear_own_files(out_dir)  # only now: a refused run leaves the folder as it was
    write_record(out_dir, record)
    resident = Resident(model, plan.tensors)
    resident.check()
    done = {p["key"] for p in record["points"]}
    bar = tqdm(total=len(points), initial=sum(p.key in done for p in points), desc="tune points", unit="point",
               disable=not opts.progress)
    for family in opts.families:
        todo = [p for p in points if p.family == family]
        if all(p.key in done for p in todo):
            continue
        tensors_of, family_doc = _family(family, todo, plan, doc, rows, calibration_rows, roles, out_dir, record,
                                         opts, device, warn)
        for index, point in enumerate(todo):
            if point.key not in done:
                record["points"].append(_measure_point(resident, tokenizer, tensors_of(index, point), sets, opts,
                                                       point, family_doc))
                write_record(out_dir, record)
                bar.update(1)
    bar.close()
    record["points"].sort(key=lambda p: [q.key for q in points].index(p["key"]))
    record["seconds_this_run"] = round(time.perf_counter() - started, 2)
    record["peak_memory"] = peak_memory(device)
    return _finish(out_dir, record, opts.budget, echo)


def _references(record: dict[str, Any], roles, sets, opts: TuneOptions, task_path: str):
    """The aligned model's figures (from its own folder, then released) and the
    fine-tune's, unless ``record`` has them; the fine-tune stays loaded: ``(model,
    tokenizer)``. A fine-tune no better than the aligned model on the task is refused."""
    harmful, benign, rows = sets
    refs = record["references"]
    if "aligned" not in refs:
        model, tokenizer = load_model(roles.aligned, opts.device)
        refs["aligned"] = measure_state(model, tokenizer, harmful, benign, rows, opts)
        del model, tokenizer
    model, tokenizer = load_model(roles.finetuned, opts.device, tokenizer_dir=roles.tokenizer)
    if "finetuned" not in refs:
        per_row = row_nll(model, tokenizer, rows, batch=opts.batch_size)
        nll_ft, nll_al = pooled_nll(per_row), refs["aligned"]["task_nll"]
        if not nll_ft < nll_al:
            raise LSSFConfigError(
                f"{task_path}: the fine-tune is no better than the aligned model on the measured task rows (task NLL "
                f"{nll_ft:.4f} >= {nll_al:.4f} nats per token): utility kept is undefined (nothing was written)")
        refs["finetuned"] = measure_state(model, tokenizer, harmful, benign, rows, opts, per_row)
    return model, tokenizer


def _measure_point(resident: Resident, tokenizer, tensors, sets, opts: TuneOptions, point: Point,
                   family_doc: dict[str, Any]) -> dict[str, Any]:
    """One point: put in the resident fine-tune, measured, taken out again."""
    started = time.perf_counter()
    resident.apply(tensors)
    try:
        measured = measure_state(resident.model, tokenizer, *sets, opts)
    finally:
        resident.undo()
    measured["seconds"] = round(time.perf_counter() - started, 2)
    return {"key": point.key, "family": point.family, "parameter": point.parameter, "value": point.value,
            "recipe": recipe_text(point_recipe(family_doc, point)), **measured}


def _resumed(out_dir: str, settings: dict[str, Any], restart: bool, echo) -> tuple[dict[str, Any] | None, bool]:
    """The record to continue in ``out_dir`` (None: start afresh), and whether tune's
    own files there are to be replaced (``--restart``)."""
    record = read_record(out_dir)
    if record is None:
        return None, False
    if restart:
        return None, True
    check_same_settings(out_dir, record, settings)
    echo(f"tune: resuming in {out_dir}: {len(record['points'])} points already measured")
    return record, False


def _family(family: str, todo: list[Point], plan, doc, rows, calibration_rows, roles, out_dir, record,
            opts: TuneOptions, device: torch.device, warn):
    """``(tensors_of(index, point), recipe doc)`` of one family: the terms of an lssf
    family are computed here, once; the contrastive family is calibrated first."""
    if family == "interpolation":
        options = MergeOptions(quiet=True, lora_merge_cache=opts.lora_merge_cache, cuda=device.type == "cuda")
        return (lambda _i, p: interpolation_tensors(point_recipe(doc, p), options, device)), doc
    family_plan, family_doc = plan, doc
    if family == "contrastive":
        family_doc = contrastive_doc(doc, os.path.join(out_dir, CALIBRATION))
        _calibrate(out_dir, [rows[i] for i in calibration_rows], calibration_rows, roles, record, opts, warn)
        family_plan = plan_recipe(MergeConfiguration.model_validate(family_doc), lora_merge_cache=opts.lora_merge_cache)
    terms = lssf_terms(family_plan, todo, device, progress=opts.progress)
    return (lambda i, _p: lssf_tensors(terms, i, device)), family_doc


def _calibrate(out_dir: str, rows: list[dict], indices: list[int], roles, record, opts: TuneOptions, warn) -> None:
    """The contrastive calibration on the calibration rows (``indices`` of TASK), once
    (kept in ``out_dir``)."""
    path = os.path.join(out_dir, CALIBRATION)
    if record.get("calibration") and os.path.isfile(path):
        return
    if os.path.exists(path):
        os.remove(path)  # tune's own, from a run stopped before it was recorded
    meta = contrastive_calibrate(roles, path, task=[Anchor(r["prompt"], r["answer"]) for r in rows], device=opts.device,
                                 progress=opts.progress, log=warn)
    record["calibration"] = {"file": path, "rows": indices, "task_rows": int(meta["task_rows"]),
                             "task_tokens": int(meta["task_tokens"]), "anchors": int(meta["anchors"]),
                             "eps": float(meta["eps"]), "max_rank": meta["max_rank"], "seconds": meta["seconds"]}
    write_record(out_dir, record)


def _finish(out_dir: str, record: dict[str, Any], budget: float, echo) -> dict[str, Any]:
    """The chosen point, tune.png, recipe.yml (or none), the final tune.json and the table."""
    record["derived"] = derived(record, budget)
    chosen, message = choose(record, budget)
    record["chosen"], record["message"] = chosen, message
    recipe_path = os.path.join(out_dir, "recipe.yml")
    if chosen is not None:
        point = next(p for p in record["points"] if p["key"] == chosen["key"])
        tmp = os.path.join(out_dir, f".tune-{os.getpid()}.yml")
        with open(tmp, "w", encoding="utf-8") as fp:
            fp.write(f"# mergekit-lssf tune: {chosen['key']} (budget {budget:g}); merge with mergekit-yaml as it is\n")
            fp.write(point["recipe"])
        os.replace(tmp, recipe_path)
    elif os.path.exists(recipe_path):
        os.remove(recipe_path)  # tune's own, from an earlier run with another budget
    tmp = os.path.join(out_dir, f".tune-{os.getpid()}.png")
    plot(record, budget, tmp)
    os.replace(tmp, os.path.join(out_dir, "tune.png"))
    write_record(out_dir, record)
    echo(table(record))
    for line in summary_lines(record, budget):
        echo(line)
    echo(message)
    peak = record["peak_memory"]
    echo(f"peak memory {peak['mib']} MiB, {peak['what']}; {record['seconds_this_run']:.0f} s this run; "
         f"written to {out_dir}/ (tune.json, tune.png" + (", recipe.yml)" if chosen else ")"))
    return record


__all__ = ["MIN_MEASUREMENT_ROWS", "TuneOptions", "check_options", "parse_grids", "tune"]
