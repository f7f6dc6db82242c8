"""Sizes, schedules, targets and the experiment's cells (one factor varied at a time)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from .data import _beside

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    """Everything a run depends on; ``tiny()`` shrinks it for the CI smoke test.

    Prompt splits (no overlap): HarmBench ``anchor`` (128) = ``harmful_train`` for
    alignment and calibration + ``harmful_val`` for choosing training settings;
    HarmBench ``test`` (72) and StrongREJECT (157 of its 313, evenly spaced) only
    evaluate. Benign prompts:
    ``train`` = replay + validation, ``test`` = over-refusal. The translation task
    (``task.py``) has train / val / test sentences, none in two of them; the training
    rows add the word list ``task_dictionary`` times.

    ``dtype``: how every model of a cell is stored (training runs in float32; a cell's
    own ``dtype``, when set, wins). The curve points (``curves.py``) are the
    repairs built and evaluated for every cell and seed.
    """

    base: Optional[str] = None  # None: SmolLM2-135M-Instruct from the registry
    harmful_train: int = 112
    harmful_val: int = 16
    harmful_test: int = 72
    strongreject: int = 157  # evenly spaced over the 313 (every other one): half the evaluation time
    benign_train: int = 22
    benign_val: int = 8
    benign_test: int = 30
    task_train: int = 240
    task_dictionary: int = 2  # times the word list (task.dictionary) is added to the training rows
    task_val: int = 24
    task_test: int = 60
    dtype: str = "bfloat16"
    batch_size: int = 8
    max_new_tokens: int = 32
    eval_batch: int = 24
    replay_tokens: int = 96  # length of each prose-replay continuation (alignment candidates with ``prose``)
    # the repairs' curves (curves.py): one model per point
    interpolations: Tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)  # l in (1 - l) * finetuned + l * aligned
    ranks: Tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # lssf-restore-rank{r} and random-restore-rank{r}
    alphas: Tuple[float, ...] = (0.5, 1.0)  # lssf-alpha{a}, fusion add
    resta_scales: Tuple[float, ...] = (0.25, 0.5, 1.0)  # resta-{s} and resta-dare-{s}
    dare_density: float = 0.7  # resta-dare: the share of the fine-tune's update DARE keeps
    safe_lora_shares: Tuple[float, ...] = (0.25, 0.5, 1.0)  # safe-lora-{q}: the share of weights projected
    # issue 47: lam of contrastive-{lam} and keep-{lam}, weakest repair first (lam falls along the curve)
    contrastive_lams: Tuple[float, ...] = (30.0, 10.0, 3.0, 1.0)
    keep_lams: Tuple[float, ...] = (10.0, 3.0, 1.0)
    # issue 47's peers: Antidote's pruned share (upstream's scripts: 0.1) and Safe Delta's relative budget,
    # swept on validation first (baselines/safedelta.py), weakest repair first
    antidote_ratios: Tuple[float, ...] = (0.01, 0.05, 0.1)
    safedelta_budgets: Tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01)
    # Safe Delta with exclude = 0 (every column may keep the fine-tune's change; upstream never keeps the 15% most
    # safety-sensitive columns, which caps its utility kept, 0.86 at budget 1 on main seed 0): budget 1 is W_ft itself
    safedelta_exclude0_budgets: Tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1)
    # issue 47's seed-0 families (seed 0 of main and align-full only, curves.SEED0_CURVES): the benign-only
    # calibration's lam, the contrastive truncation's ranks (at curves.CONTRASTIVE_RANK_LAM), the contrastive curve's
    # extra lam, and the ranks of the paper's calibrated subspace (Eq. 4) with fusion restore
    benign_lams: Tuple[float, ...] = (10.0, 3.0, 1.0)
    contrastive_ranks: Tuple[int, ...] = (16, 64, 256)
    contrastive_seed0_lams: Tuple[float, ...] = (0.3,)
    calibrated_ranks: Tuple[int, ...] = (16, 64, 256)
    utility_floor: float = 0.95  # safe-lora's choice on validation: most refusal at utility kept >= this
    # LoRA alignment candidates, tried in order until one meets the targets on validation
    # (perplexity on the held-out validation prose). First: the one setting that met every
    # target in the validation sweep of 2026-11-25 (alignment_prose_check.py): benign
    # self-answer replay plus plain-prose replay (``prose``: 4 continuations of each
    # replay opening sampled from the unaligned model, language-model loss). The rest,
    # kept for that sweep's record, each missed a target on the held-out prose.
    align_candidates: List[Dict] = field(default_factory=lambda: [
        dict(rank=16, lr=2e-4, epochs=2, benign_repeat=4, prose=4),
        dict(rank=16, lr=2e-4, epochs=2, benign_repeat=4),  # the testbed's choice until 2026-11-25
        dict(rank=16, lr=1.5e-4, epochs=2, benign_repeat=6),
        dict(rank=8, lr=3e-4, epochs=2, benign_repeat=6),
        dict(rank=16, lr=1e-4, epochs=3, benign_repeat=6),
        dict(rank=16, lr=5e-5, epochs=2, benign_repeat=6),
        dict(rank=16, lr=2e-4, epochs=1, benign_repeat=4),
        dict(rank=16, lr=2e-4, epochs=2, benign_repeat=4, prose=2),
    ])
    # benign LoRA drift candidates, tried in order until validation refusal falls by
    # drift_drop with the task learned (validation word accuracy >= task_learned)
    drift_candidates: List[Dict] = field(default_factory=lambda: [
        dict(rank=16, lr=5e-4, epochs=2),
        dict(rank=16, lr=5e-4, epochs=3),
        dict(rank=16, lr=5e-4, epochs=4),
    ])
    # the align-full cell's one setting; ``prose``: the same plain-prose replay as the LoRA
    # alignment (main), so that the cell differs from main in LoRA against full SFT alone
    full_align: Dict = field(default_factory=lambda: dict(lr=5e-5, epochs=2, benign_repeat=2, prose=4))
    full_drift: Dict = field(default_factory=lambda: dict(lr=5e-5, epochs=2))
    inverse: Dict = field(default_factory=lambda: dict(lr=5e-5, epochs=2))
    compliance_samples: int = 24
    targets: Dict = field(default_factory=lambda: dict(refusal=0.8, over_refusal=0.15, perplexity_ratio=1.15, drift_drop=0.4,
                                                       task_learned=0.4))
    main_seeds: Tuple[int, ...] = (0, 1, 2)
    random_control_seed: int = 1234

    @classmethod
    def tiny(cls, base: str) -> "Settings":
        return cls(base=base, harmful_train=6, harmful_val=4, harmful_test=4, strongreject=4, benign_train=4,
                   benign_val=2, benign_test=4, task_train=8, task_dictionary=1, task_val=4, task_test=4, batch_size=4,
                   max_new_tokens=4, eval_batch=8, interpolations=(0.5,), ranks=(2,), alphas=(0.5,),
                   resta_scales=(0.5,), safe_lora_shares=(0.5, 1.0), contrastive_lams=(3.0,), keep_lams=(3.0,),
                   antidote_ratios=(0.1,), safedelta_budgets=(0.3,), safedelta_exclude0_budgets=(0.5,), benign_lams=(3.0,),
                   contrastive_ranks=(2,), contrastive_seed0_lams=(0.3,), calibrated_ranks=(2,), replay_tokens=8,
                   align_candidates=[dict(rank=4, lr=1e-3, epochs=1, benign_repeat=1), dict(rank=4, lr=2e-3, epochs=1, benign_repeat=1, prose=1)],
                   drift_candidates=[dict(rank=4, lr=1e-3, epochs=1)],
                   full_align=dict(lr=1e-4, epochs=1, benign_repeat=1, prose=1), full_drift=dict(lr=1e-4, epochs=1),
                   inverse=dict(lr=1e-4, epochs=1), compliance_samples=2, main_seeds=(0, 1))


def candidate_name(c: Dict) -> str:
    """The folder name of a LoRA training setting ``c`` (rank, lr, epochs, and for
    alignment the benign replay factor and prose samples per opening): the sweeps' caches
    are keyed by setting, so reordering or adding candidates never reuses a wrong model."""
    name = f"r{c['rank']}-lr{c['lr']:g}-e{c['epochs']}"
    name += f"-b{c['benign_repeat']}" if "benign_repeat" in c else ""
    return name + (f"-p{c['prose']}" if c.get("prose") else "")


@dataclass(frozen=True)
class Cell:
    """One combination of arms. ``align``: lora | full; ``reference`` (the unaligned
    model of the recipes): pre (the model before alignment) | inverse (the aligned
    model fine-tuned to comply, the paper's inverse safety vector); ``drift``: lora
    (benign) | full (benign) | compliance (the harmful fine-tuning attack of v1).
    ``dtype``: None stores the models in ``Settings.dtype`` and shares ``unaligned`` and
    ``aligned`` with the other cells; a dtype variant (``main-float32``) stores its own."""

    name: str
    align: str
    reference: str
    drift: str
    note: str
    dtype: Optional[str] = None

    def storage(self, settings: "Settings") -> str:
        """The dtype this cell's models are stored in."""
        return self.dtype or settings.dtype

    @property
    def reference_model(self) -> str:
        """The name of the recipes' unaligned model in this cell."""
        return "unaligned-inverse" if self.reference == "inverse" else "unaligned"


CELLS = {
    "main": Cell("main", "lora", "pre", "lora", "LoRA alignment, pre-alignment reference, benign LoRA drift"),
    "align-full": Cell("align-full", "full", "pre", "lora", "full-parameter SFT alignment instead of LoRA (same data and prose replay)"),
    "reference-inverse": Cell("reference-inverse", "lora", "inverse", "lora", "unaligned reference = aligned model fine-tuned to comply (inverse safety vector)"),
    "drift-full": Cell("drift-full", "lora", "pre", "full", "benign full fine-tune instead of benign LoRA"),
    "main-float32": Cell("main-float32", "lora", "pre", "lora", "the main cell with every model stored in float32 (the dtype effect)",
                         dtype="float32"),
    "attack": Cell("attack", "lora", "pre", "compliance", "harmful fine-tuning attack: task + compliance-only samples (v1's fine-tune); reported apart"),
}


# the cells built with every seed of ``Settings.main_seeds`` (the others: seed 0)
PRIMARY = ("main", "align-full")


def has_seed0_families(cell: str, seed: int) -> bool:
    """Whether cell ``cell`` (its name) at ``seed`` builds issue 47's seed-0 families
    (``curves.SEED0_CURVES``): seed 0 of the ``PRIMARY`` cells."""
    return seed == 0 and cell in PRIMARY


# the settings one arm alone reads: a cell that does not use the arm does not depend on them
ARM_SETTINGS = {"full_align": lambda c: c.align == "full", "full_drift": lambda c: c.drift == "full",
                "compliance_samples": lambda c: c.drift == "compliance", "inverse": lambda c: c.reference == "inverse"}


# the curves' points (curves.py): each is one more repair of a run's trained models, built
# and evaluated on its own, so adding a point to a list changes no model already built (the
# points chosen on validation are chosen again among the longer list). The digest leaves
# them out; each run lists the models it has, and the report names what a run lacks.
CURVE_POINTS = ("interpolations", "ranks", "alphas", "resta_scales", "safe_lora_shares", "contrastive_lams", "keep_lams",
                "antidote_ratios", "safedelta_budgets", "safedelta_exclude0_budgets", "benign_lams", "contrastive_ranks",
                "contrastive_seed0_lams", "calibrated_ranks")


def cell_settings(settings: Settings, cell: Cell) -> Dict:
    """Every field of ``settings`` that ``cell``'s models depend on, as a dict:
    ``ARM_SETTINGS`` of the arms it does not use and the ``CURVE_POINTS`` lists left out."""
    return {k: v for k, v in asdict(settings).items()
            if k not in CURVE_POINTS and (k not in ARM_SETTINGS or ARM_SETTINGS[k](cell))}


# the project's own texts the models and the choice of settings depend on (lssf_testbed/)
TEXTS = ("validation_prose.txt", "replay_openings.txt")


class SettingsMismatch(ValueError):
    """A published run or a testbed folder was built with other settings (another
    ``settings_digest``); the command line reports it in one line."""


def settings_digest(settings: Settings, cell: str) -> str:
    """The first 12 hex digits of the SHA-256 of what ``cell``'s models depend on: the
    cell itself, ``cell_settings`` and the ``TEXTS``. Runs with different digests must not be
    summarised together, nor a testbed folder resumed with other settings; runs with other
    curve points may (``CURVE_POINTS``)."""
    texts = {name: hashlib.sha256(_beside(name).encode("utf-8")).hexdigest() for name in TEXTS}
    text = json.dumps({"cell": asdict(CELLS[cell]), "settings": cell_settings(settings, CELLS[cell]), "texts": texts},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def cell_folder(out: str, cell: str, seed: int) -> str:
    """The folder of one cell and seed under the testbed folder ``out``: it holds
    ``models/`` and ``eval/``. The main cell's seed 0 is ``out`` itself; the others are
    ``out/cells/CELL`` (seed 0) or ``out/cells/CELL-seedK``."""
    if cell == "main" and seed == 0:
        return out
    return os.path.join(out, "cells", cell if seed == 0 else f"{cell}-seed{seed}")


def aligned_path(out: str, arm: str) -> str:
    """The aligned model of alignment arm ``arm`` (lora | full) under ``out``: the main
    cell's for LoRA, ``align-full``'s for full SFT (seed 0 of either)."""
    return os.path.join(cell_folder(out, "align-full" if arm == "full" else "main", 0), "models", "aligned")


def eval_path(model: str) -> str:
    """The cached evaluation (JSON) of the model stored in folder ``model``:
    ``FOLDER/eval/NAME.json`` beside the ``FOLDER/models/NAME`` it evaluates."""
    return os.path.join(os.path.dirname(os.path.dirname(model)), "eval", os.path.basename(model) + ".json")


def model_path(out: str, cell: Cell, seed: int, name: str) -> str:
    """The folder of model ``name`` of ``cell`` and ``seed`` under ``out``, built or not:
    ``unaligned`` is shared (main cell, seed 0), ``aligned`` is the arm's (the main cell's
    for LoRA, ``align-full``'s for full SFT), ``unaligned-inverse`` is the cell's seed 0;
    every other model is the cell and seed's own. A dtype variant keeps its own
    ``unaligned`` and ``aligned`` (seed 0)."""
    if cell.dtype is not None and name in ("unaligned", "aligned"):
        return os.path.join(cell_folder(out, cell.name, 0), "models", name)
    if name == "unaligned":
        return os.path.join(cell_folder(out, "main", 0), "models", "unaligned")
    if name == "aligned":
        return aligned_path(out, cell.align)
    return os.path.join(cell_folder(out, cell.name, 0 if name == "unaligned-inverse" else seed), "models", name)
