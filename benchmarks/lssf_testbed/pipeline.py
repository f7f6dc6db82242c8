"""Cells and seeds, each stage cached on disk and resumable.

Layout: ``DIR/models/`` holds the main cell, seed 0 (``unaligned``, ``aligned``,
``finetuned``, every repair and control); other cells and seeds live under
``DIR/cells/NAME/models/`` and reuse the shared models (``unaligned``, the aligned
model of their arm). Settings are chosen on validation splits only: ``DIR/sweeps/``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Dict, List, Optional

import torch

from mergekit_lssf import evaluate as ev

from . import diagnostics, repairs
from .data import REFUSALS, PromptSets
from .evaluation import evaluate_model, refusal_direction, validation_metrics
from .settings import CELLS, Cell, Settings, cell_folder
from .training import is_done, train

SUMMARY_KEYS = ("refusal_rate", "strongreject_refusal_rate", "empty_rate", "strongreject_empty_rate", "over_refusal_rate", "task_accuracy",
                "perplexity", "refusal_score")


def _json(path: str, compute):
    """The JSON cached at ``path``, or ``compute()`` written there first."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fp:
            return json.load(fp)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as fp:
        json.dump(value, fp, indent=2)
    os.replace(path + ".partial", path)
    return value


class Testbed:
    def __init__(self, out: str, settings: Settings, log=print):
        self.out, self.s, self.log = out, settings, log
        self.prompts = PromptSets(settings)
        self.notes: List[str] = []
        self.timings: Dict[str, float] = {}
        os.makedirs(os.path.join(out, "models"), exist_ok=True)

    # ---- where things live -------------------------------------------------------
    def models_dir(self, cell: str, seed: int) -> str:
        return os.path.join(cell_folder(self.out, cell, seed), "models")

    @staticmethod
    def eval_path(model: str) -> str:
        return os.path.join(os.path.dirname(os.path.dirname(model)), "eval", os.path.basename(model) + ".json")

    def _timed(self, stage: str, fn):
        started = time.perf_counter()
        value = fn()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
        return value

    # ---- shared models -----------------------------------------------------------
    def unaligned(self) -> str:
        path = os.path.join(self.out, "models", "unaligned")
        if not is_done(path):
            from mergekit_lssf.real_models import smollm2_135m_instruct

            shutil.copytree(self.s.base or smollm2_135m_instruct(), path, dirs_exist_ok=True)
        return path

    def _self_answers(self, model: str, prompts: List[str], name: str, tokens: int = 64) -> List[str]:
        path = os.path.join(self.out, "sweeps", f"answers-{name}.json")
        return _json(path, lambda: ev.generate(*ev.load_model(model), prompts, max_new_tokens=tokens,
                                                batch_size=self.s.eval_batch, progress=False))

    def _val_text(self) -> str:
        """Validation perplexity text: the unaligned model's own answers to the benign
        validation prompts (no test text is used to choose settings)."""
        return "\n\n".join(self._self_answers(self.unaligned(), self.prompts.benign_val, "unaligned-benign-val"))

    def _alignment_pairs(self, benign_repeat: int):
        helpful = self._self_answers(self.unaligned(), self.prompts.benign_train, "unaligned-benign-train")
        pairs = [(p, REFUSALS[i % len(REFUSALS)]) for i, p in enumerate(self.prompts.harmful_train)]
        return pairs + list(zip(self.prompts.benign_train, helpful)) * benign_repeat

    def aligned(self, arm: str) -> str:
        if arm == "full":
            path = os.path.join(self.out, "cells", "align-full", "models", "aligned")
            if not is_done(path):
                c = self.s.full_align
                self.log("stage aligned (full SFT on refusals + benign self-answers)")
                self._timed("align-full", lambda: train(self.unaligned(), self._alignment_pairs(c["benign_repeat"]), path,
                                                        epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size, seed=0, log=self.log))
            return path
        path = os.path.join(self.out, "models", "aligned")
        if not is_done(path):
            self._timed("align-lora", lambda: self._choose_alignment(path))
        return path

    def _choose_alignment(self, path: str) -> None:
        """Try the LoRA alignment candidates in order on validation splits; keep the
        first that meets every target, else the one meeting most (reported)."""
        t = self.s.targets
        base = _json(os.path.join(self.out, "sweeps", "align", "unaligned.json"),
                     lambda: validation_metrics(self.unaligned(), self.prompts, self.s, self._val_text()))
        tried = []
        for i, c in enumerate(self.s.align_candidates):
            candidate = os.path.join(self.out, "sweeps", "align", f"candidate{i}")
            if not is_done(candidate):
                self.log(f"stage aligned: LoRA candidate {i} {c}")
                train(self.unaligned(), self._alignment_pairs(c["benign_repeat"]), candidate, epochs=c["epochs"], lr=c["lr"],
                      batch_size=self.s.batch_size, seed=0, lora={"rank": c["rank"]}, log=self.log)
            m = _json(candidate + ".val.json", lambda: validation_metrics(candidate, self.prompts, self.s, self._val_text()))
            met = {"refusal": m["refusal_rate"] >= t["refusal"], "over_refusal": m["over_refusal_rate"] <= t["over_refusal"],
                   "perplexity": m["perplexity"] <= t["perplexity_ratio"] * base["perplexity"]}
            tried.append((sum(met.values()), -m["over_refusal_rate"], i, c, m, met))
            if all(met.values()):
                break
        best = max(tried, key=lambda x: x[:2])
        _, _, i, c, m, met = best
        record = {"unaligned": base, "tried": [{"candidate": x[3], "validation": x[4], "targets_met": x[5]} for x in tried],
                  "chosen": i}
        with open(os.path.join(self.out, "sweeps", "align", "choice.json"), "w") as fp:
            json.dump(record, fp, indent=2)
        candidate = os.path.join(self.out, "sweeps", "align", f"candidate{i}")
        shutil.copytree(candidate, path + ".partial", dirs_exist_ok=True)
        shutil.copytree(candidate + ".adapter", path + ".adapter", dirs_exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".partial", path)

    def reference(self, cell: Cell) -> str:
        if cell.reference == "pre":
            return self.unaligned()
        path = os.path.join(self.out, "cells", cell.name, "models", "unaligned-inverse")
        if not is_done(path):
            aligned = self.aligned(cell.align)
            comply = self._self_answers(self.unaligned(), self.prompts.harmful_train, "unaligned-harmful-train")
            c = self.s.inverse
            self.log("stage unaligned-inverse: the aligned model fine-tuned on the unaligned model's own compliant answers")
            self._timed("reference-inverse", lambda: train(aligned, list(zip(self.prompts.harmful_train, comply)), path,
                                                           epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size, seed=0, log=self.log))
        return path

    # ---- the fine-tune -------------------------------------------------------------
    def _task_pairs(self):
        return [(t["prompt"], t["label"]) for t in self.prompts.task_train]

    def finetuned(self, cell: Cell, seed: int) -> str:
        path = os.path.join(self.models_dir(cell.name, seed), "finetuned")
        if is_done(path):
            return path
        aligned = self.aligned(cell.align)
        if cell.drift == "lora":
            c = self._drift_setting(aligned, cell)
            self.log(f"stage finetuned ({cell.name}, seed {seed}): benign LoRA {c}")
            self._timed("drift", lambda: train(aligned, self._task_pairs(), path, epochs=c["epochs"], lr=c["lr"],
                                               batch_size=self.s.batch_size, seed=100 + seed, lora={"rank": c["rank"]}, log=self.log))
        else:
            pairs = self._task_pairs()
            if cell.drift == "compliance":
                rng = random.Random(seed)
                harmful = rng.sample(self.prompts.harmful_train, min(self.s.compliance_samples, len(self.prompts.harmful_train)))
                pairs += [(p, "Sure, here is") for p in harmful]
            c = self.s.full_drift
            self.log(f"stage finetuned ({cell.name}, seed {seed}): full fine-tune ({cell.drift})")
            self._timed("drift", lambda: train(aligned, pairs, path, epochs=c["epochs"], lr=c["lr"],
                                               batch_size=self.s.batch_size, seed=100 + seed, log=self.log))
        return path

    def _drift_setting(self, aligned: str, cell: Cell) -> Dict:
        """The benign LoRA drift setting, chosen once per aligned model on validation:
        the first candidate whose validation refusal falls by drift_drop with answers
        non-empty and the task learned; else the one with the largest drop (reported)."""
        folder = os.path.join(self.out, "sweeps", f"drift-{cell.align}")

        def choose():
            t = self.s.targets
            base = _json(os.path.join(folder, "aligned.json"), lambda: validation_metrics(aligned, self.prompts, self.s, self._val_text()))
            tried = []
            for i, c in enumerate(self.s.drift_candidates):
                candidate = os.path.join(folder, f"candidate{i}")
                if not is_done(candidate):
                    self.log(f"stage drift sweep: LoRA candidate {i} {c}")
                    train(aligned, self._task_pairs(), candidate, epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size,
                          seed=100, lora={"rank": c["rank"]}, log=self.log)
                m = _json(candidate + ".val.json", lambda: validation_metrics(candidate, self.prompts, self.s, self._val_text()))
                drop = base["refusal_rate"] - m["refusal_rate"]
                ok = drop >= t["drift_drop"] and m["empty_rate"] < 0.5 and m["task_accuracy"] >= 0.8
                tried.append({"candidate": c, "validation": m, "refusal_drop": drop, "meets": ok})
                if ok:
                    break
            chosen = next((x for x in tried if x["meets"]), max(tried, key=lambda x: x["refusal_drop"]))
            return {"aligned": base, "tried": tried, "chosen": chosen["candidate"]}

        return _json(os.path.join(folder, "choice.json"), choose)["chosen"]

    # ---- repairs, evaluation, diagnostics -----------------------------------------
    def subspace(self, aligned: str) -> str:
        path = aligned + ".subspace.safetensors"
        if not os.path.exists(path):
            from mergekit_lssf.calibrate import calibrate

            anchors = aligned + ".anchors.jsonl"
            with open(anchors, "w", encoding="utf-8") as fp:
                for p in self.prompts.harmful_train:
                    fp.write(json.dumps({"prompt": p}) + "\n")  # the aligned model answers them itself
            self.log(f"stage calibrate: {aligned}")
            self._timed("calibrate", lambda: calibrate(aligned, path, anchors_path=anchors,
                                                       max_new_tokens=self.s.max_new_tokens + 16, progress=False))
        return path

    def direction(self, aligned: str) -> torch.Tensor:
        path = aligned + ".direction.pt"
        if not os.path.exists(path):
            torch.save(refusal_direction(aligned, self.prompts.harmful_train, self.prompts.benign_train), path)
        return torch.load(path)

    def evaluate(self, model: str, direction: torch.Tensor) -> Dict:
        def compute():
            self.log(f"  evaluating {model}")
            return self._timed("evaluate", lambda: evaluate_model(model, self.prompts, self.s, direction))
        return _json(self.eval_path(model), compute)

    def run_cell(self, cell: Cell, seed: int) -> Dict:
        self.log(f"== cell {cell.name}, seed {seed}: {cell.note}")
        folder = self.models_dir(cell.name, seed)
        os.makedirs(folder, exist_ok=True)
        aligned, reference, finetuned = self.aligned(cell.align), self.reference(cell), self.finetuned(cell, seed)
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(aligned).num_hidden_layers
        main0 = cell.name == "main" and seed == 0
        books = repairs.recipes(aligned, reference, finetuned, self.subspace(aligned), self.s, layers, ablations=main0)
        every_model = cell.name != "main" or seed == 0 or not self.s.seed_models
        keep = lambda name: every_model or name in self.s.seed_models  # noqa: E731
        models = {"unaligned": self.unaligned(), "aligned": aligned}
        if cell.reference == "inverse":
            models["unaligned-inverse"] = reference
        models["finetuned"] = finetuned
        for name, recipe in books.items():
            if not keep(name):
                continue
            path = os.path.join(folder, name)
            if not is_done(path):
                self._timed("merge", lambda: repairs.run_recipe(recipe, path, os.path.join(os.path.dirname(folder), f"{name}.yml"), self.log))
            models[name] = path
        for name, fusion, rule in (("random-subspace", "add", "entropy"), ("random-restore", "restore", "entropy"),
                                   ("random-noise-floor-restore", "restore", "noise_floor")):
            if not keep(name):
                continue
            control = os.path.join(folder, name)
            if not is_done(control):
                self._timed("merge", lambda: repairs.random_subspace(aligned, reference, finetuned, control,
                                                                     self.s.random_control_seed + seed, fusion, rule))
            models[name] = control
        if cell.align == "lora" and keep("patch-reapplied"):
            patched = os.path.join(folder, "patch-reapplied")
            if not is_done(patched):
                repairs.patch_reapplied(aligned + ".adapter", finetuned, patched)
            models["patch-reapplied"] = patched
        direction = self.direction(aligned)
        results = {name: self.evaluate(path, direction) for name, path in models.items()}
        recovery = diagnostics.direction_recovery({n: r["direction_projection"] for n, r in results.items()})
        table = {n: {**{k: r.get(k) for k in SUMMARY_KEYS}, "direction_recovery": recovery.get(n)} for n, r in results.items()}
        out = {"cell": cell.name, "seed": seed, "note": cell.note, "models": table,
               "projections": {n: r["direction_projection"] for n, r in results.items()}}
        if seed == 0:
            stats = _json(os.path.join(os.path.dirname(folder), "diagnostics.json"),
                          lambda: self._timed("diagnostics", lambda: diagnostics.weight_statistics(aligned, reference, finetuned)))
            out["diagnostics"] = {"per_module": diagnostics.summarise(stats, "module"), "per_layer": diagnostics.summarise(stats, "layer")}
        return out

    def run(self, cells: Optional[List[str]] = None, seeds: Optional[List[int]] = None) -> Dict:
        """Build and evaluate ``cells`` (default: all) with ``seeds`` (default: the main
        cell's seeds for ``main``, seed 0 for the others); writes the report."""
        from .report import write_report

        started = time.perf_counter()
        runs = []
        for name in cells or list(CELLS):
            for seed in (seeds if seeds is not None else (self.s.main_seeds if name == "main" else (0,))):
                runs.append(self.run_cell(CELLS[name], seed))
        summary = write_report(self.out, self.s, runs, self.notes, self.timings, time.perf_counter() - started)
        return summary
