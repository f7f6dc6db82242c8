"""Cells and seeds, each stage cached on disk and resumable.

Layout: ``DIR/models/`` holds the main cell, seed 0 (``unaligned``, ``aligned``,
``finetuned`` and every repair of ``curves.py``); other cells and seeds live under
``DIR/cells/NAME/models/`` and reuse the shared models (``unaligned``, the aligned
model of their arm). Training runs in float32 and every model is stored in its
cell's dtype (``Cell.storage``). Settings are chosen on validation splits only:
``DIR/sweeps/``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Dict, List, Optional, Tuple

from mergekit_lssf import evaluate as ev
from mergekit_lssf.measure import utility_kept

from . import repairs
from .curves import CALIBRATION_OF, CHOICES, PEERS, candidates, points, repair_names
from .data import REFUSALS, PromptSets, replay_openings, validation_prose
from .evaluation import evaluate_model, validation_metrics
from .report import publish_report, write_report
from .settings import (CELLS, PRIMARY, Cell, Settings, SettingsMismatch, candidate_name, cell_folder, eval_path,
                       has_seed0_families, model_path, settings_digest)
from .training import is_done, sample_continuations, store, train

DRIFT_SEED = 100  # training seed of the drift sweep's candidates and of drift seed 0 (seed k: DRIFT_SEED + k)
SUMMARY_KEYS = ("refusal_rate", "strongreject_refusal_rate", "empty_rate", "strongreject_empty_rate", "over_refusal_rate",
                "task_nll", "task_word_accuracy", "perplexity")


def _cached(path: str):
    """The JSON cached at ``path``, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fp:
        return json.load(fp)


def _json(path: str, compute):
    """The JSON cached at ``path``, or ``compute()`` written there first."""
    value = _cached(path)
    if value is not None:
        return value
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as fp:
        json.dump(value, fp, indent=2)
    os.replace(path + ".partial", path)
    return value


def alignment_targets_met(metrics: Dict, base_perplexity: float, targets: Dict) -> Dict[str, bool]:
    """Which alignment targets (``Settings.targets``) the validation ``metrics`` of a
    candidate meet; perplexity against the unaligned model's ``base_perplexity`` on the
    same text."""
    return {"refusal": metrics["refusal_rate"] >= targets["refusal"],
            "over_refusal": metrics["over_refusal_rate"] <= targets["over_refusal"],
            "perplexity": metrics["perplexity"] <= targets["perplexity_ratio"] * base_perplexity}


def _write_jsonl(path: str, rows: List[Dict]) -> None:
    """``rows`` as JSON lines at ``path`` (written at once, its folder made)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as fp:
        for row in rows:
            fp.write(json.dumps(row) + "\n")
    os.replace(path + ".partial", path)


def _copy_model(source: str, path: str) -> None:
    """A copy of model folder ``source`` at ``path`` (written at once)."""
    shutil.rmtree(path + ".partial", ignore_errors=True)
    shutil.copytree(source, path + ".partial")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".partial", path)


class Testbed:
    def __init__(self, out: str, settings: Settings, log=print):
        self.out, self.s, self.log = out, settings, log
        self.prompts = PromptSets(settings)
        self.notes: List[str] = []
        self.timings: Dict[str, float] = {}
        self._norms: Dict[str, Dict] = {}  # fine-tune folder -> Antidote's input norms (_antidote_norms)
        os.makedirs(os.path.join(out, "models"), exist_ok=True)

    # ---- where things live -------------------------------------------------------
    def models_dir(self, cell: str, seed: int) -> str:
        return os.path.join(cell_folder(self.out, cell, seed), "models")

    def _timed(self, stage: str, fn):
        started = time.perf_counter()
        value = fn()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
        return value

    # ---- shared models -----------------------------------------------------------
    def model_path(self, cell: Cell, seed: int, name: str) -> str:
        """``settings.model_path`` under this testbed's folder."""
        return model_path(self.out, cell, seed, name)

    def model_names(self, cell: Cell, seed: int) -> List[str]:
        """Every model ``run_cell`` builds and evaluates for ``cell`` and ``seed``, in
        report order: the references, the fine-tune and every repair (``curves.py``)."""
        reference = [cell.reference_model] if cell.reference_model != "unaligned" else []
        return ["unaligned", "aligned"] + reference + ["finetuned"] + repair_names(
            self.s, seed0=has_seed0_families(cell.name, seed))

    def unaligned(self, cell: Cell = CELLS["main"]) -> str:
        """``cell``'s unaligned model: SmolLM2-135M-Instruct (or ``Settings.base``) stored
        in ``Settings.dtype``, shared by every cell; a dtype variant stores those same
        values in its own dtype, so that its delta differs from main's in storage only."""
        shared = self.model_path(CELLS["main"], 0, "unaligned")
        if not is_done(shared):
            from mergekit_lssf.real_models import smollm2_135m_instruct

            store(self.s.base or smollm2_135m_instruct(), shared, self.s.dtype)
        path = self.model_path(cell, 0, "unaligned")
        store(shared, path, cell.storage(self.s))
        return path

    def _self_answers(self, model: str, prompts: List[str], name: str, tokens: int = 64) -> List[str]:
        path = os.path.join(self.out, "sweeps", f"answers-{name}.json")
        return _json(path, lambda: ev.generate(*ev.load_model(model), prompts, max_new_tokens=tokens,
                                                batch_size=self.s.eval_batch, progress=False))

    @staticmethod
    def _val_text() -> str:
        """Validation perplexity text: the held-out prose ``data.validation_prose`` (no
        test text is used to choose settings; no training text is drawn from it). Until
        2026-11-25 it was ``unaligned``'s own answers to the benign validation prompts,
        which the alignment's benign replay trains on, so it could not see the
        alignment's cost on other prose."""
        return validation_prose()

    def _validation(self, model: str, cache: str) -> Dict:
        """``model``'s validation metrics (``evaluation.validation_metrics`` with
        ``_val_text``), cached at ``cache``."""
        return _json(cache, lambda: validation_metrics(model, self.prompts, self.s, self._val_text()))

    def _alignment_pairs(self, benign_repeat: int):
        helpful = self._self_answers(self.unaligned(), self.prompts.benign_train, "unaligned-benign-train")
        pairs = [(p, REFUSALS[i % len(REFUSALS)]) for i, p in enumerate(self.prompts.harmful_train)]
        return pairs + list(zip(self.prompts.benign_train, helpful)) * benign_repeat

    def aligned(self, cell: Cell) -> str:
        """``cell``'s aligned model, stored in its dtype: the chosen LoRA alignment
        candidate (``sweeps/align/``) or the full-SFT alignment (``sweeps/align-full/model``),
        both trained once in float32 from the shared ``unaligned``."""
        path = self.model_path(cell, 0, "aligned")
        if is_done(path):
            return path
        if cell.align == "full":
            source = os.path.join(self.out, "sweeps", "align-full", "model")
            if not is_done(source):
                c = self.s.full_align
                self.log("stage aligned (full SFT on refusals, benign self-answers and prose replay)")
                texts = self._prose_replay(c["prose"]) if c.get("prose") else ()
                self._timed("align-full", lambda: train(self.unaligned(), self._alignment_pairs(c["benign_repeat"]), source,
                                                        epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size, seed=0,
                                                        texts=texts, log=self.log))
        else:
            source = self._timed("align-lora", self._choose_alignment)
        store(source, path, cell.storage(self.s))
        return path

    def _prose_replay(self, samples: int) -> List[Tuple[str, str]]:
        """``samples`` continuations of each replay opening (``data.replay_openings``) by
        the unaligned model, sampled at temperature 1, ``Settings.replay_tokens`` tokens
        each, seed 0; cached."""
        path = os.path.join(self.out, "sweeps", f"prose-replay-x{samples}.json")
        return [tuple(p) for p in _json(path, lambda: sample_continuations(
            self.unaligned(), replay_openings(), samples=samples, tokens=self.s.replay_tokens, seed=0,
            batch_size=self.s.eval_batch))]

    def alignment_candidate(self, i: int) -> str:
        """LoRA alignment candidate ``i`` of ``Settings.align_candidates``, trained once
        into ``DIR/sweeps/align/NAME`` (``settings.candidate_name``); its folder."""
        c = self.s.align_candidates[i]
        candidate = os.path.join(self.out, "sweeps", "align", candidate_name(c))
        if not is_done(candidate):
            self.log(f"stage aligned: LoRA candidate {i} {c}")
            texts = self._prose_replay(c["prose"]) if c.get("prose") else ()
            train(self.unaligned(), self._alignment_pairs(c["benign_repeat"]), candidate, epochs=c["epochs"], lr=c["lr"],
                  batch_size=self.s.batch_size, seed=0, lora={"rank": c["rank"]}, texts=texts, log=self.log)
        return candidate

    def alignment_base(self) -> Dict:
        """``unaligned``'s validation metrics, the alignment sweep's reference; cached in
        ``DIR/sweeps/align/unaligned.json``."""
        return self._validation(self.unaligned(), os.path.join(self.out, "sweeps", "align", "unaligned.json"))

    def _alignment_check(self, model: str) -> Tuple[Dict, Dict[str, bool]]:
        """An aligned ``model``'s validation metrics (cached beside its folder as
        ``model.val.json``) and which alignment targets they meet."""
        m = self._validation(model, model + ".val.json")
        return m, alignment_targets_met(m, self.alignment_base()["perplexity"], self.s.targets)

    def alignment_validation(self, i: int) -> Tuple[Dict, Dict[str, bool]]:
        """``_alignment_check`` of alignment candidate ``i`` (``NAME.val.json``)."""
        return self._alignment_check(self.alignment_candidate(i))

    def _choose_alignment(self) -> str:
        """Try the LoRA alignment candidates in order on validation splits; the first
        that meets every target, else the one meeting most (reported): its folder."""
        base = self.alignment_base()
        tried = []
        for i, c in enumerate(self.s.align_candidates):
            m, met = self.alignment_validation(i)
            tried.append((sum(met.values()), -m["over_refusal_rate"], i, c, m, met))
            if all(met.values()):
                break
        best = max(tried, key=lambda x: x[:2])
        _, _, i, c, m, met = best
        record = {"unaligned": base, "tried": [{"candidate": x[3], "validation": x[4], "targets_met": x[5]} for x in tried],
                  "chosen": i}
        with open(os.path.join(self.out, "sweeps", "align", "choice.json"), "w") as fp:
            json.dump(record, fp, indent=2)
        return self.alignment_candidate(i)

    def _check_full_alignment(self, path: str) -> None:
        """The full-SFT alignment ``path`` has one setting, not a sweep: its
        ``_alignment_check`` is recorded in ``DIR/sweeps/align-full/validation.json`` and
        a missed target is named in the report's notes."""
        m, met = self._alignment_check(path)
        folder = os.path.join(self.out, "sweeps", "align-full")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "validation.json"), "w") as fp:
            json.dump({"setting": self.s.full_align, "unaligned": self.alignment_base(), "validation": m, "targets_met": met},
                      fp, indent=2)
        missed = [k for k, ok in met.items() if not ok]
        note = f"align-full: the full-SFT alignment misses the validation target(s) {', '.join(missed)}"
        if missed and note not in self.notes:
            self.notes.append(note)

    def reference(self, cell: Cell) -> str:
        if cell.reference == "pre":
            return self.unaligned(cell)
        path = self.model_path(cell, 0, "unaligned-inverse")
        if not is_done(path):
            aligned = self.aligned(cell)
            comply = self._self_answers(self.unaligned(), self.prompts.harmful_train, "unaligned-harmful-train")
            c = self.s.inverse
            self.log("stage unaligned-inverse: the aligned model fine-tuned on the unaligned model's own compliant answers")
            self._timed("reference-inverse", lambda: train(aligned, list(zip(self.prompts.harmful_train, comply)), path,
                                                           epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size, seed=0, log=self.log,
                                                           dtype=cell.storage(self.s)))
        return path

    # ---- the fine-tune -------------------------------------------------------------
    def _task_pairs(self):
        return [(t["prompt"], t["answer"]) for t in self.prompts.task_train]

    def finetuned(self, cell: Cell, seed: int) -> str:
        path = self.model_path(cell, seed, "finetuned")
        if is_done(path):
            return path
        aligned, dtype = self.aligned(cell), cell.storage(self.s)
        if cell.drift == "lora":
            c, candidate = self._drift_setting(aligned, cell)
            if seed == 0 and is_done(candidate):  # the sweep trained this very model (same data, setting and seed): reuse it
                self.log(f"stage finetuned ({cell.name}, seed 0): benign LoRA {c}, the sweep's {os.path.basename(candidate)}")
                _copy_model(candidate, path)
                return path
            # seed 0 lands here when the sweep's choice.json was reused without its candidates
            # (published beside the runs): training with seed DRIFT_SEED gives that same model
            self.log(f"stage finetuned ({cell.name}, seed {seed}): benign LoRA {c}")
            self._timed("drift", lambda: train(aligned, self._task_pairs(), path, epochs=c["epochs"], lr=c["lr"],
                                               batch_size=self.s.batch_size, seed=DRIFT_SEED + seed, lora={"rank": c["rank"]},
                                               log=self.log, dtype=dtype))
        else:
            pairs = self._task_pairs()
            if cell.drift == "compliance":
                rng = random.Random(seed)
                harmful = rng.sample(self.prompts.harmful_train, min(self.s.compliance_samples, len(self.prompts.harmful_train)))
                pairs += [(p, "Sure, here is") for p in harmful]
            c = self.s.full_drift
            self.log(f"stage finetuned ({cell.name}, seed {seed}): full fine-tune ({cell.drift})")
            self._timed("drift", lambda: train(aligned, pairs, path, epochs=c["epochs"], lr=c["lr"],
                                               batch_size=self.s.batch_size, seed=DRIFT_SEED + seed, log=self.log, dtype=dtype))
        return path

    def _drift_setting(self, aligned: str, cell: Cell) -> Tuple[Dict, str]:
        """The benign LoRA drift setting, chosen once per aligned model on validation:
        the first candidate whose validation refusal falls by drift_drop with answers
        non-empty and the task learned; else the one with the largest drop (reported).
        Returns the setting and the folder of the candidate trained with it (seed
        ``DRIFT_SEED``, i.e. the drift of seed 0)."""
        folder = os.path.join(self.out, "sweeps", f"drift-{cell.align}" + (f"-{cell.dtype}" if cell.dtype else ""))

        def choose():
            t = self.s.targets
            base = self._validation(aligned, os.path.join(folder, "aligned.json"))
            tried = []
            for i, c in enumerate(self.s.drift_candidates):
                candidate = os.path.join(folder, f"candidate{i}")
                if not is_done(candidate):
                    self.log(f"stage drift sweep: LoRA candidate {i} {c}")
                    train(aligned, self._task_pairs(), candidate, epochs=c["epochs"], lr=c["lr"], batch_size=self.s.batch_size,
                          seed=DRIFT_SEED, lora={"rank": c["rank"]}, log=self.log, dtype=cell.storage(self.s))
                m = self._validation(candidate, candidate + ".val.json")
                drop = base["refusal_rate"] - m["refusal_rate"]
                ok = drop >= t["drift_drop"] and m["empty_rate"] < 0.5 and m["task_word_accuracy"] >= t["task_learned"]
                tried.append({"candidate": c, "validation": m, "refusal_drop": drop, "meets": ok})
                if ok:
                    break
            chosen = next((x for x in tried if x["meets"]), max(tried, key=lambda x: x["refusal_drop"]))
            return {"aligned": base, "tried": tried, "chosen": chosen["candidate"]}

        choice = _json(os.path.join(folder, "choice.json"), choose)
        index = [x["candidate"] for x in choice["tried"]].index(choice["chosen"])
        return choice["chosen"], os.path.join(folder, f"candidate{index}")

    # ---- the contrastive calibrations (issue 47) -------------------------------------
    def calibration_path(self, cell: Cell, seed: int, kind: str) -> str:
        """The calibration file of ``kind`` (``contrastive``, ``keep``, ``benign`` or
        ``calibrated``: ``curves.CALIBRATION_OF``) of ``cell`` and ``seed``:
        ``FOLDER/calibration/KIND.safetensors`` beside its ``models/``."""
        return os.path.join(cell_folder(self.out, cell.name, seed), "calibration", f"{kind}.safetensors")

    def _anchor_file(self, cell: Cell, aligned: str) -> str:
        """The ``harmful_train`` prompts (never ``harmful_val``, on which ``lam`` is chosen)
        with ``aligned``'s own greedy answers (the package's ``fill_responses``, calibrate's
        64 new tokens), as the anchors JSONL of both calibrations and of Safe Delta;
        cached per aligned model (``sweeps/anchors-ARM[-DTYPE].jsonl``)."""
        path = os.path.join(self.out, "sweeps", f"anchors-{cell.align}" + (f"-{cell.dtype}" if cell.dtype else "") + ".jsonl")
        if not os.path.exists(path):
            import torch
            from mergekit_lssf.calibrate import Anchor, fill_responses

            answered = fill_responses(aligned, [Anchor(p, None) for p in self.prompts.harmful_train],
                                      device=torch.device("cpu"), batch_size=self.s.batch_size, max_new_tokens=64,
                                      progress=False)
            _write_jsonl(path, [{"prompt": a.prompt, "response": a.response} for a in answered])
        return path

    def calibration(self, cell: Cell, seed: int, kind: str, models: Dict[str, str]) -> str:
        """Build (once) the calibration ``kind`` (``calibration_path``) as a user would,
        with the package's own command in a child process, ANCHORS the ``_anchor_file``:

        * ``contrastive``: ``mergekit-lssf calibrate RECIPE --task TASK --anchors ANCHORS
          --out FILE --max-rank full``, RECIPE the cell's lssf recipe (fine-tune as base,
          its aligned model), TASK the fine-tune's training rows (``_task_pairs``), eps 1e-6;
        * ``keep``: the same with ``--keep-control``;
        * ``benign``: the same without ``--task`` (benign-only);
        * ``calibrated``: ``mergekit-lssf calibrate ALIGNED --anchors ANCHORS --out FILE
          --max-rank R`` (Eq. 4), R the largest of ``Settings.calibrated_ranks``.

        Its summary line, wall time and peak memory (the child's ``ru_maxrss``) go to
        ``KIND.json`` beside the file. Returns the file."""
        import resource
        import subprocess
        import sys

        import yaml

        path = self.calibration_path(cell, seed, kind)
        if os.path.exists(path):
            if kind == "calibrated":
                self._check_calibrated_rank(path)
            return path
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        anchors = self._anchor_file(cell, models["aligned"])
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
        self.log(f"stage calibration {kind} ({cell.name}, seed {seed})")
        common = ["--anchors", anchors, "--out", path + ".partial", "--device", "cpu", "--batch-size", str(self.s.batch_size)]
        program = os.path.join(os.path.dirname(sys.executable), "mergekit-lssf")
        if kind == "calibrated":
            command = [program, "calibrate", models["aligned"], *common, "--max-rank", str(max(self.s.calibrated_ranks))]
        else:
            recipe, task = os.path.join(folder, "recipe.yml"), os.path.join(folder, "task.jsonl")
            with open(recipe, "w", encoding="utf-8") as fp:
                yaml.safe_dump({"merge_method": "lssf", "base_model": models["finetuned"], "dtype": "float32",
                                "models": [{"model": models["aligned"], "parameters": {"role": "aligned"}}]}, fp)
            _write_jsonl(task, [{"prompt": prompt, "answer": answer} for prompt, answer in self._task_pairs()])
            command = [program, "calibrate", recipe, *common, "--max-rank", "full"]
            command += {"contrastive": ["--task", task], "keep": ["--task", task, "--keep-control"], "benign": []}[kind]
        started = time.perf_counter()
        done = self._timed("calibration", lambda: subprocess.run(command, capture_output=True, text=True))
        if done.returncode != 0:
            raise RuntimeError(f"calibrate {kind} failed: {done.stderr.strip()[-2000:]}")
        record = {"command": ["mergekit-lssf", *command[1:]], "summary": done.stdout.strip(),
                  "seconds": round(time.perf_counter() - started, 1),
                  "peak_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                  "peak_note": "the largest ru_maxrss of this process's children so far (calibrations are the only "
                               "heavy ones)"}
        with open(path[: -len(".safetensors")] + ".json", "w") as fp:
            json.dump(record, fp, indent=2)
        os.replace(path + ".partial", path)
        return path

    def _check_calibrated_rank(self, path: str) -> None:
        """SettingsMismatch when the Eq. 4 file ``path`` holds fewer vectors per weight
        (its ``max_rank``) than the largest of ``Settings.calibrated_ranks``: the merge would
        cap the rank at what is stored, and the model's name would say more."""
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            stored = int(handle.metadata()["max_rank"])
        if max(self.s.calibrated_ranks) > stored:
            raise SettingsMismatch(f"{path}: calibrated with --max-rank {stored}, below calibrated_ranks "
                                   f"{max(self.s.calibrated_ranks)}; remove it and the calibrated-restore-rank models "
                                   "built from it, or use a new --out folder")

    def _antidote_norms(self, finetuned: str) -> Dict:
        """Antidote's input norms (``baselines.antidote.input_norms``) of the fine-tune
        ``finetuned`` over the ``harmful_train`` prompts with the unaligned model's own
        compliant answers: one forward pass shared by ``antidote`` and ``antidote-update``
        (kept for this process, keyed by the fine-tune's folder)."""
        from baselines.antidote import input_norms

        if finetuned not in self._norms:
            comply = self._self_answers(self.unaligned(), self.prompts.harmful_train, "unaligned-harmful-train")
            self._norms[finetuned] = self._timed("merge", lambda: input_norms(
                finetuned, list(zip(self.prompts.harmful_train, comply)), batch_size=self.s.batch_size, device="cpu"))
        return self._norms[finetuned]

    def peer_baseline(self, cell: Cell, seed: int, curve: str, models: Dict[str, str]) -> None:
        """Write every point of peer curve ``antidote``, ``antidote-update``, ``safedelta`` or
        ``safedelta-exclude0`` (``curves.py``) of
        ``cell`` and ``seed`` not yet complete, from one pass of its rows (``baselines``; the two
        Antidote curves share theirs: ``_antidote_norms``),
        each with its per-weight figures in ``NAME.json`` beside it."""
        from baselines.antidote import antidote_states
        from baselines.safedelta import safedelta_states

        wanted = {p.value: self.model_path(cell, seed, p.name) for p in points(self.s) if p.curve == curve}
        wanted = {v: path for v, path in wanted.items() if not is_done(path)}
        if not wanted:
            return
        self.log(f"stage {curve} ({cell.name}, seed {seed}): {', '.join(f'{v:g}' for v in wanted)}")
        if curve.startswith("antidote"):
            update = models["aligned"] if curve == "antidote-update" else None  # prune the update, not the weights
            norms = self._antidote_norms(models["finetuned"])
            built = self._timed("merge", lambda: antidote_states(models["finetuned"], (), list(wanted), aligned_dir=update,
                                                                 norms=norms))
        else:  # harmful prompts with the aligned model's refusals (the calibrations' anchors)
            with open(self._anchor_file(cell, models["aligned"]), encoding="utf-8") as fp:
                rows = [json.loads(line) for line in fp]
            exclude = {"exclude": 0.0} if curve == "safedelta-exclude0" else {}  # else upstream's 0.15
            built = self._timed("merge", lambda: safedelta_states(
                models["aligned"], models["finetuned"], rows, list(wanted), batch_size=self.s.batch_size, device="cpu",
                **exclude))
        for value, path in wanted.items():
            repairs._write_like(models["finetuned"], built.states[value], path)
            with open(path + ".json", "w") as fp:
                json.dump(built.stats[value], fp, indent=2)

    # ---- repairs and evaluation ----------------------------------------------------
    def evaluate(self, model: str) -> Dict:
        def compute():
            self.log(f"  evaluating {model}")
            return self._timed("evaluate", lambda: evaluate_model(model, self.prompts, self.s))
        return _json(eval_path(model), compute)

    def build_repair(self, cell: Cell, seed: int, name: str, books: Dict[str, dict], models: Dict[str, str]) -> None:
        """Write repair ``name`` of ``cell`` and ``seed`` (a recipe of ``books`` through
        mergekit-yaml, or a ``repairs`` function) unless it is complete; ``models`` holds
        the paths of ``aligned``, ``reference`` and ``finetuned``."""
        path = self.model_path(cell, seed, name)
        if is_done(path):
            return
        dtype, inputs = cell.storage(self.s), (models["aligned"], models["reference"], models["finetuned"])
        point = {p.name: p for p in points(self.s, seed0=True)}.get(name)
        recipe_dir = os.path.dirname(self.models_dir(cell.name, seed))
        if point is not None and point.curve in CALIBRATION_OF:
            self.calibration(cell, seed, CALIBRATION_OF[point.curve], models)
        if point is not None and point.curve in PEERS:
            self.peer_baseline(cell, seed, point.curve, models)
        elif name in books:
            self._timed("merge", lambda: repairs.run_recipe(books[name], path, os.path.join(recipe_dir, f"{name}.yml"), self.log,
                                                            seed=self.s.random_control_seed + seed))
        elif point is not None and point.curve == "random-restore-rank":
            self._timed("merge", lambda: repairs.random_restore(*inputs, path, self.s.random_control_seed + seed,
                                                                 int(point.value), dtype))
        elif point is not None and point.curve == "safe-lora":
            info = self._timed("merge", lambda: repairs.safe_lora(*inputs, path, point.value, dtype))
            with open(path + ".json", "w") as fp:
                json.dump(info, fp, indent=2)
        else:
            raise ValueError(f"no way to build repair {name!r}")

    def choose(self, cell: Cell, seed: int, chosen: str) -> Dict:
        """The point ``chosen`` (a key of ``curves.CHOICES``) picks on the validation
        splits: among ``curves.candidates``, the one with the most validation refusal of
        those that keep at least ``Settings.utility_floor`` of the fine-tune's validation
        task NLL (``measure.utility_kept`` between ``aligned`` and ``finetuned``), ties to
        the earlier candidate; the first candidate when none does. The model ``chosen`` is
        a copy of it (folder and evaluation); the record is ``.../CHOSEN.choice.json``."""
        path = self.model_path(cell, seed, chosen)

        def choose():
            val = {n: self._validation(self.model_path(cell, seed, n), self.model_path(cell, seed, n) + ".val.json")
                   for n in ("aligned", "finetuned")}
            tried = []
            for index, name in enumerate(candidates(self.s, chosen)):
                m = self._validation(self.model_path(cell, seed, name), self.model_path(cell, seed, name) + ".val.json")
                kept = utility_kept(m["task_nll"], val["aligned"]["task_nll"], val["finetuned"]["task_nll"])
                tried.append({"name": name, "index": index, "validation": m, "utility_kept": kept,
                              "meets": kept >= self.s.utility_floor})
            meeting = [t for t in tried if t["meets"]]
            best = max(meeting, key=lambda t: (t["validation"]["refusal_rate"], -t["index"])) if meeting else tried[0]
            return {"references": val, "tried": tried, "chosen": best["name"], "utility_floor": self.s.utility_floor}

        cached = _cached(path + ".choice.json")
        if cached is not None and [t["name"] for t in cached["tried"]] != candidates(self.s, chosen):
            # chosen before among other curve points (settings.CURVE_POINTS): choose again, copy again
            self.log(f"{chosen}: its candidates changed since it was chosen; choosing again")
            for stale in (path + ".choice.json", eval_path(path)):
                if os.path.exists(stale):
                    os.remove(stale)
            shutil.rmtree(path, ignore_errors=True)
        choice = _json(path + ".choice.json", choose)
        if not is_done(path):
            _copy_model(self.model_path(cell, seed, choice["chosen"]), path)
        evaluation = eval_path(path)
        if not os.path.exists(evaluation):
            shutil.copy(eval_path(self.model_path(cell, seed, choice["chosen"])), evaluation)
        return choice

    def run_cell(self, cell: Cell, seed: int) -> Dict:
        """Build, repair and evaluate every model of ``cell`` and ``seed``; the run record."""
        self.log(f"== cell {cell.name}, seed {seed}: {cell.note}")
        os.makedirs(self.models_dir(cell.name, seed), exist_ok=True)
        models = {"aligned": self.aligned(cell), "reference": self.reference(cell), "finetuned": self.finetuned(cell, seed)}
        self.unaligned(cell)  # evaluated with the rest, also where the reference is another model
        if cell.align == "full":
            self._check_full_alignment(models["aligned"])
        calibrations = {kind: self.calibration_path(cell, seed, kind) for kind in set(CALIBRATION_OF.values())}
        books = repairs.recipes(models["aligned"], models["reference"], models["finetuned"], self.s, cell.storage(self.s),
                                calibrations)
        results, choices = {}, {}
        for name in self.model_names(cell, seed):
            if name in CHOICES:
                choices[name] = self.choose(cell, seed, name)
            elif name not in ("unaligned", "aligned", "finetuned", cell.reference_model):
                self.build_repair(cell, seed, name, books, models)
            results[name] = self.evaluate(self.model_path(cell, seed, name))
        return self._record(cell, seed, results, choices)

    @staticmethod
    def _record(cell: Cell, seed: int, results: Dict[str, Dict], choices: Dict[str, Dict]) -> Dict:
        """The run record of one cell and seed from its evaluations (model -> the
        ``evaluate_model`` dict): the summary metrics, the per-row task measures (for
        resampling) and the choices made on validation (``curves.CHOICES``)."""
        table = {n: {k: r.get(k) for k in SUMMARY_KEYS} for n, r in results.items()}
        return {"cell": cell.name, "seed": seed, "note": cell.note, "models": table,
                "task_rows": {n: r.get("task_rows") for n, r in results.items()},
                "choices": {n: {k: c[k] for k in ("chosen", "tried")} for n, c in choices.items() if c}}

    def _check_digests(self, cells) -> None:
        """A testbed folder is resumed only with what built it: ``DIR/digests.json``
        records each cell's ``settings_digest`` when it is first built here; SettingsMismatch,
        before anything is built, for a cell whose digest differs (its cached models and
        sweeps would be reused silently)."""
        path = os.path.join(self.out, "digests.json")
        seen = _cached(path) or {}
        ours = {name: settings_digest(self.s, name) for name in sorted(cells)}
        for name, digest in ours.items():
            if seen.get(name, digest) != digest:
                raise SettingsMismatch(f"--out {self.out}: cell {name} was built there with settings {seen[name]}, these are "
                                 f"{digest}; use a new --out folder")
        with open(path, "w") as fp:
            json.dump({**seen, **ours}, fp, indent=2)

    def _selection(self, cells: Optional[List[str]], seeds: Optional[List[int]]):
        for name in cells or list(CELLS):
            for seed in (seeds if seeds is not None else (self.s.main_seeds if name in PRIMARY else (0,))):
                yield CELLS[name], seed

    def run(self, cells: Optional[List[str]] = None, seeds: Optional[List[int]] = None) -> Dict:
        """Build and evaluate ``cells`` (default: all) with ``seeds`` (default: the main
        cell's seeds for ``main``, seed 0 for the others); writes the report."""
        started = time.perf_counter()
        selection = list(self._selection(cells, seeds))
        self._check_digests({cell.name for cell, _ in selection})
        runs = [self.run_cell(cell, seed) for cell, seed in selection]
        return write_report(self.out, self.s, runs, self.notes, self.timings, time.perf_counter() - started)

    def report_only(self, cells: Optional[List[str]] = None, seeds: Optional[List[int]] = None,
                    publish: Optional[str] = None) -> Dict:
        """Build and evaluate nothing: the report of ``cells`` and ``seeds`` (defaults as
        ``run``) from the evaluations already cached, each missing model named in the
        notes, a cell and seed without an evaluated fine-tune left out. ``publish``: write
        the report files (results, runs, plots, the settings sweeps' JSON) there instead
        of under the testbed folder, with the testbed folder's path written as ``DIR``."""
        runs = []
        for cell, seed in self._selection(cells, seeds):
            names = self.model_names(cell, seed)
            cached = {n: _cached(eval_path(self.model_path(cell, seed, n))) for n in names}
            results = {n: r for n, r in cached.items() if r is not None}
            where = f"cell {cell.name}, seed {seed}"
            if "finetuned" not in results:
                self.notes.append(f"{where}: not evaluated in this testbed folder" +
                                  ("; its run published before, if any, is kept" if publish else ""))
                continue
            missing = [n for n in names if n not in results]
            if missing:
                self.notes.append(f"{where}: {len(results)} of {len(names)} models evaluated; not yet: {', '.join(missing)}")
            choices = {n: _cached(self.model_path(cell, seed, n) + ".choice.json") for n in CHOICES}
            runs.append(self._record(cell, seed, results, choices))
        if publish is None:
            return write_report(self.out, self.s, runs, self.notes, {}, 0.0)
        return publish_report(self.out, publish, self.s, runs, self.notes)
