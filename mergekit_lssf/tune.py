"""``mergekit-lssf tune``: the safety-utility curve of a recipe's repairs on the user's
own task, and the recipe it picks (issue 48).

Every point (``tune_points``) is put into one resident copy of the fine-tune, measured
with the package's measures (``measure.py``) and taken out again:

* refusal on the shipped HarmBench ``test`` prompts (never the ``anchor`` split, which
  calibration reads; the package ships no StrongREJECT), empty answers, over-refusal
  on the shipped benign ``test`` prompts, each set capped at ``max_prompts``
  (``measure.evenly_spaced``, the testbed's choice);
* task NLL on the measurement rows of TASK (all of them, or, when the ``contrastive``
  family runs, the half that ``measure.split_halves`` does not give the calibration),
  utility kept against the fine-tune and the aligned model, perplexity on shipped prose;
* the bootstrap interval of each refusal rate over its prompts.

Every model is measured by ``evaluate.measure_model``, the function ``eval`` uses.
The fine-tune and the aligned model are measured too (the aligned model from its own
folder, as ``eval`` would), after a check that the fine-tune is better than the aligned
model on the measured task rows (task NLL only, before anything is generated); the
contrastive family's calibration runs before the fine-tune is loaded to stay. Terms
and points are computed on the CPU (``tune_points``); ``--device`` places the model
that is measured. The chosen point wins back the most refusal with utility
kept >= 1 - budget (ties: the lower task cost), chosen on one half of the harmful
prompts and reported on the other (``tune_report.choose``). ``tune.json`` is written
atomically after every point, so a rerun into the same folder resumes and Ctrl-C
loses at most the point being measured.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from mergekit_lssf.evaluate import measure_model
from mergekit_lssf.generation import load_model
from mergekit_lssf.measure import evenly_spaced, pooled_nll, row_nll, split_halves
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.provenance import versions
from mergekit_lssf.recipe import load_recipe
from mergekit_lssf.subspace_file import model_fingerprint
from mergekit_lssf.tune_points import Resident, interpolation_tensors, lssf_tensors, lssf_terms
from mergekit_lssf.tune_recipes import (
    FAMILIES,
    Point,
    check_calibration_rows,
    check_grid_value,
    check_tune_recipe,
    contrastive_doc,
    default_grid,
    mild_to_strong,
    point_recipe,
    read_doc,
    recipe_text,
    referenced_files,
    swept_parameter,
    with_tokenizer_source,
)
from mergekit_lssf.tune_report import (
    CALIBRATION,
    FORMAT,
    check_record,
    check_same_settings,
    choose,
    clear_own_files,
    derived,
    plot,
    probe_writable,
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
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise LSSFConfigError(f"--device {opts.device}: torch finds no CUDA device here; use --device cpu (or auto)")
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


def family_points(opts: TuneOptions, plan, calibration: str) -> list[Point]:
    """Every point, family by family, each family's grid from its mildest repair to its
    strongest without repeats; each value checked by the merge's own rules (``plan``:
    the recipe's; ``calibration``: the contrastive family's file)."""
    points = []
    fusion = plan.parameters()["fusion"]
    for family in opts.families:
        parameter = swept_parameter(family, fusion)
        for value in mild_to_strong(parameter, opts.grids.get(family) or default_grid(parameter, opts.points)):
            check_grid_value(family, parameter, value, plan, calibration)
            points.append(Point(family, parameter, value))
    return points


# ---------------------------------------------------------------- prompts and task rows


def harmful_sets(max_prompts: int) -> dict[str, list[str]]:
    """The held-out harmful prompt sets: HarmBench ``test`` (72 prompts), capped at
    ``max_prompts`` (``evenly_spaced``, as the testbed caps a set)."""
    return {"harmbench": evenly_spaced(ev.harmbench_prompts("test"), max_prompts)}


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


def _measured(model, tokenizer, sets, opts: TuneOptions, per_row=None) -> dict[str, Any]:
    """Every measure of the model as it is now (``evaluate.measure_model``; ``per_row``:
    its task ``row_nll``, when already computed), without the answers."""
    harmful, benign, rows = sets
    started = time.perf_counter()
    out = measure_model(model, tokenizer, harmful=harmful, benign=benign, text=ev.benign_text(), rows=rows,
                        per_row=per_row, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                        progress=opts.progress)
    del out["answers"], out["benign_answers"]
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
    config, user_doc = load_recipe(recipe_path), read_doc(recipe_path)
    check_tune_recipe(recipe_path, user_doc, opts.families)
    task = load_task(task_path)
    rows = [{"prompt": r.prompt, "answer": r.response} for r in task]
    calibration_rows, measured_rows = task_split(len(rows), "contrastive" in opts.families)
    if "lssf" in opts.families:
        check_calibration_rows(user_doc, task, measured_rows, task_path)
    plan = plan_recipe(config, lora_merge_cache=opts.lora_merge_cache)
    doc = with_tokenizer_source(user_doc, plan)
    points = family_points(opts, plan, os.path.join(out_dir, CALIBRATION))
    if len(measured_rows) < MIN_MEASUREMENT_ROWS:
        warn(f"tune: warning: utility is measured on {len(measured_rows)} task rows (fewer than "
             f"{MIN_MEASUREMENT_ROWS}): utility kept is noisy")
    roles = _roles(recipe_path, opts.lora_merge_cache)
    harmful, benign = harmful_sets(opts.max_prompts), evenly_spaced(ev.benign_prompts("test"), opts.max_prompts)
    unaligned = plan.refs.get("unaligned")
    settings = {
        "recipe": _sha256(recipe_text(doc)),
        "models": {**roles.lineage(), "aligned": model_fingerprint(roles.aligned),
                   **({"unaligned": model_fingerprint(unaligned.model.path)}
                      if unaligned is not None and os.path.isdir(unaligned.model.path) else {})},
        "task": anchors_sha256(task), "task_rows": len(rows), "measurement_rows": measured_rows,
        "families": list(opts.families), "grids": {f: [p.value for p in points if p.family == f] for f in opts.families},
        "max_prompts": opts.max_prompts, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens,
        "device": torch.device(opts.device).type, "prompts": {**{k: len(v) for k, v in harmful.items()},
                                                              "benign": len(benign)},
        "files": referenced_files(user_doc), "versions": versions(),
    }
    record, restarting = _resumed(out_dir, settings, opts.restart, echo)
    if record is None:
        choose_half, report_half = split_halves([p for prompts in harmful.values() for p in prompts], seed=0)
        record = {"format": FORMAT, "settings": settings, "recipe_file": recipe_path, "task_file": task_path,
                  "halves": {"choose": choose_half, "report": report_half}, "references": {}, "points": []}
    record["versions"], record["budget"] = versions(), opts.budget
    probe_writable(out_dir)
    started = time.perf_counter()
    sets = (harmful, benign, [rows[i] for i in measured_rows])
    done = {p["key"] for p in record["points"]}

    def begin() -> None:  # the checks passed: from here on tune writes
        if restarting:
            clear_own_files(out_dir)
        write_record(out_dir, record)

    def calibrate() -> None:  # before the fine-tune is loaded to stay
        if "contrastive" in opts.families and any(p.key not in done for p in points if p.family == "contrastive"):
            _calibrate(out_dir, [rows[i] for i in calibration_rows], calibration_rows, roles, record, opts, warn)

    model, tokenizer = _references(record, roles, sets, opts, task_path, out_dir, begin, calibrate)
    resident = Resident(model, plan.tensors)
    resident.check()
    bar = tqdm(total=len(points), initial=sum(p.key in done for p in points), desc="tune points", unit="point",
               disable=not opts.progress)
    for family in opts.families:
        todo = [p for p in points if p.family == family]
        if all(p.key in done for p in todo):
            continue
        tensors_of, family_doc = _family(family, todo, doc, out_dir, opts)
        for index, point in enumerate(todo):
            if point.key not in done:
                record["points"].append(_measure_point(resident, tokenizer, tensors_of(index, point), sets, opts,
                                                       point, family_doc))
                write_record(out_dir, record)
                bar.update(1)
    bar.close()
    order = [q.key for q in points]
    record["points"].sort(key=lambda p: order.index(p["key"]) if p["key"] in order else len(order))
    record["seconds_this_run"] = round(time.perf_counter() - started, 2)
    record["peak_memory"] = peak_memory(torch.device(opts.device))
    return _finish(out_dir, record, opts.budget, echo)


def _roles(recipe_path: str, lora_merge_cache: str | None):
    """The fine-tune and the aligned model as local folders (``recipe_models``), its
    refusals in tune's words."""
    try:
        return recipe_models(load_recipe(recipe_path), lora_merge_cache)  # plan.config is planned (rewritten)
    except LSSFConfigError as error:
        raise LSSFConfigError("tune: " + str(error).removeprefix("calibrate: ")) from None


def _load(folder: str, opts: TuneOptions, tokenizer_dir: str | None = None):
    return load_model(folder, opts.device, tokenizer_dir=tokenizer_dir)


def _references(record: dict[str, Any], roles, sets, opts: TuneOptions, task_path: str, out_dir: str,
                begin: Callable[[], None], calibrate: Callable[[], None]):
    """The aligned model's and the fine-tune's figures, unless ``record`` has them; the
    fine-tune stays loaded: ``(model, tokenizer)``. First the task NLL of both: a
    fine-tune no better than the aligned model on the task is refused before anything
    is generated or written; then ``begin()``, the aligned model's measures (from its
    own folder, then released), ``calibrate()``, and the fine-tune's."""
    harmful, benign, rows = sets
    refs = record["references"]
    ft_rows = aligned = None
    if "finetuned" not in refs:
        model, tokenizer = _load(roles.finetuned, opts, roles.tokenizer)
        ft_rows = row_nll(model, tokenizer, rows, batch=opts.batch_size)
        del model, tokenizer
    if "aligned" not in refs:
        aligned = _load(roles.aligned, opts)
        al_rows = row_nll(*aligned, rows, batch=opts.batch_size)
    else:
        al_rows = refs["aligned"]["task_rows"]
    if ft_rows is not None and not pooled_nll(ft_rows) < pooled_nll(al_rows):
        raise LSSFConfigError(
            f"{task_path}: the fine-tune is no better than the aligned model on the measured task rows (task NLL "
            f"{pooled_nll(ft_rows):.4f} >= {pooled_nll(al_rows):.4f} nats per token): utility kept is undefined "
            "(nothing was written)")
    begin()
    if aligned is not None:
        refs["aligned"] = _measured(*aligned, sets, opts, al_rows)
        write_record(out_dir, record)
        del aligned
    calibrate()
    model, tokenizer = _load(roles.finetuned, opts, roles.tokenizer)
    if "finetuned" not in refs:
        refs["finetuned"] = _measured(model, tokenizer, sets, opts, ft_rows)
        write_record(out_dir, record)
    return model, tokenizer


def _measure_point(resident: Resident, tokenizer, tensors, sets, opts: TuneOptions, point: Point,
                   family_doc: dict[str, Any]) -> dict[str, Any]:
    """One point: put in the resident fine-tune, measured, taken out again (also when
    putting it in fails half way)."""
    started = time.perf_counter()
    try:
        resident.apply(tensors)
        measured = _measured(resident.model, tokenizer, sets, opts)
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
    check_record(out_dir, record)
    check_same_settings(out_dir, record, settings)
    echo(f"tune: resuming in {out_dir}: {len(record['points'])} points already measured")
    return record, False


def _family(family: str, todo: list[Point], doc: dict[str, Any], out_dir: str, opts: TuneOptions):
    """``(tensors_of(index, point), recipe doc)`` of one family: the terms of an lssf
    family are computed here, once, on the CPU (the contrastive family's calibration
    is made before the fine-tune is loaded)."""
    options = MergeOptions(quiet=True, lora_merge_cache=opts.lora_merge_cache)
    if family == "interpolation":
        return (lambda _i, p: interpolation_tensors(point_recipe(doc, p), options)), doc
    family_doc = doc
    if family == "contrastive":
        family_doc = contrastive_doc(doc, os.path.join(out_dir, CALIBRATION))
        plan_recipe(MergeConfiguration.model_validate(family_doc), lora_merge_cache=opts.lora_merge_cache)  # checks
    terms = lssf_terms(MergeConfiguration.model_validate(family_doc), options, todo, progress=opts.progress)
    return (lambda i, _p: lssf_tensors(terms, i)), family_doc


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
    tmp = os.path.join(out_dir, f".tune-{os.getpid()}.png")
    plot(record, budget, tmp)
    os.replace(tmp, os.path.join(out_dir, "tune.png"))
    recipe_path = os.path.join(out_dir, "recipe.yml")
    if chosen is not None:
        point = next(p for p in record["points"] if p["key"] == chosen["key"])
        tmp = os.path.join(out_dir, f".tune-{os.getpid()}.yml")
        with open(tmp, "w", encoding="utf-8") as fp:
            fp.write(f"# mergekit-lssf tune: {chosen['key']} (budget {budget:g}); merge with plain mergekit-yaml "
                     "(bit-identical to the weights tune measured)\n")
            fp.write(point["recipe"])
        os.replace(tmp, recipe_path)
    elif os.path.exists(recipe_path):
        os.remove(recipe_path)  # tune's own, from an earlier run with another budget
    write_record(out_dir, record)
    echo(table(record))
    for line in summary_lines(record, budget):
        echo(line)
    echo(message)
    peak = record["peak_memory"]
    echo(f"peak memory {peak['mib']} MiB, {peak['what']}; {record['seconds_this_run']:.0f} s this run; "
         f"written to {out_dir}/ (tune.json, tune.png" + (", recipe.yml)" if chosen else ")"))
    return record


__all__ = ["MIN_MEASUREMENT_ROWS", "TuneOptions", "check_options", "family_points", "harmful_sets", "parse_grids",
           "tune"]
