"""Checks that protect the user before anything is written: model folders that do not
exist, output folders that already hold a model or files mergekit would replace, and a
recipe whose roles are (``lora_lineage_error``) or look (``role_swap_warning``) swapped.

Reads only file listings, safetensors headers and, for the role checks, a handful of
tensors or a fingerprint. No mergekit import: model references are the ones callers pass in.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional

import torch

from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import StoredTensor, folder_index, read_tensor
from mergekit_lssf.subspace_file import model_fingerprint

#: Files whose presence means a folder already holds model weights.
MODEL_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
#: Every file mergekit 0.1.5's ``run_merge`` may write in its output folder
#: (mergekit/merge.py: weights and their index, config.json, the card README.md,
#: mergekit_config.yml, a saved or copied tokenizer, generation_config.json and
#: chat-template files); an output folder holding any of them is refused.
MERGE_OUTPUTS = MODEL_FILES + (
    "*.bin.index.json", "config.json", "README.md", "mergekit_config.yml", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "video_preprocessor_config.json",
)
#: The role check warns when the fine-tune's median position along the directions of
#: W_aligned - W_unaligned (0: the model marked unaligned, 1: the one marked aligned) is below this.
SWAP_MEDIAN = 1 / 3
#: Fewer directions than this (all sampled weights together): the role check says nothing.
SWAP_MIN_DIRECTIONS = 8
#: Fused weights sampled for the role check.
SWAP_SAMPLES = 4
#: A sampled weight counts only when delta fills at least this share of its smaller side.
SWAP_MIN_SHARE = 0.5


def looks_local(path: str) -> bool:
    """A path, not a hub repo id: absolute, relative with ./ or ../, ~, or existing."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def check_model_folder(path: str, field: str, *, local: bool = False) -> None:
    """A local model reference must be a folder with config.json and weights.
    ``local``: the path is known to be local (a command-line folder), never a hub id."""
    if not local and not looks_local(path):
        return
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        raise LSSFConfigError(f"{field}: no model folder at {path}")
    files = os.listdir(folder)
    if "config.json" not in files and "adapter_config.json" not in files:
        raise LSSFConfigError(f"{field}: {path} holds no config.json (not a model folder)")
    if not any(fnmatch.fnmatch(f, pattern) for f in files for pattern in WEIGHT_FILES):
        raise LSSFConfigError(f"{field}: {path} holds no weights (*.safetensors or *.bin)")


def existing_files(folder: str, patterns: Iterable[str]) -> List[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if any(fnmatch.fnmatch(f, p) for p in patterns))


def check_output_folder(folder: str, patterns: Optional[Iterable[str]] = None, what: Optional[str] = None) -> None:
    """Refuse an output folder that already holds files we would overwrite or leave
    stale beside the new ones; nothing is deleted.

    Without ``patterns`` (a merge): the files mergekit 0.1.5's ``run_merge`` writes
    (``MERGE_OUTPUTS``: weights, config.json, README.md, mergekit_config.yml, tokenizer and
    generation files), whoever wrote them: a folder holding the user's own README.md is
    refused, not overwritten (issue 49)."""
    found = existing_files(folder, MERGE_OUTPUTS if patterns is None else patterns)
    if not found:
        return
    if what is None:
        weights = existing_files(folder, MODEL_FILES)
        what = "model weights" if weights else "files that the merge would replace"
    shown = ", ".join(found[:6]) + (f", ... ({len(found)} files)" if len(found) > 6 else "")
    raise LSSFConfigError(
        f"output folder {folder} already holds {what} ({shown}); choose an empty or new "
        "folder, or remove them yourself (nothing was written or deleted)"
    )


def role_swap_warning(finetuned: Any, aligned: Any, unaligned: Any, names: List[str]) -> Optional[str]:
    """A warning when the fine-tune sits at the model marked unaligned along most
    directions of the safety vector; None otherwise (and whenever it cannot tell).

    What the weights can tell (issue 49): with ``delta = W_aligned - W_unaligned`` (as
    the recipe marks them) and its singular directions ``(u_i, v_i, sigma_i)``, the
    fine-tune's position along direction i is ``c_i = u_i^T (W_ft - W_unaligned) v_i /
    sigma_i``: 0 at the model marked unaligned, 1 at the one marked aligned. A
    fine-tune keeps its parent's position along most of these directions; one that
    erased its safety moved back along the few top (safety) directions, not along the
    many others (the tail of the alignment delta, or its 16-bit rounding). So in a
    correct recipe the median of ``c_i`` over every direction of the sampled weights
    stays near 1 even when the fine-tune walked most of the way back to the unaligned
    weights, and with swapped roles it is near 0. Warns when the median is below
    ``SWAP_MEDIAN`` over at least ``SWAP_MIN_DIRECTIONS`` directions.

    Limits: the distance of the fine-tune to each model cannot tell a swap from erased
    safety (the geometry of the three points is the same), and neither can this check
    when delta has only a few directions that the fine-tune may all have undone (e.g. a
    LoRA alignment stored in float32): so it says nothing unless delta fills at least
    ``SWAP_MIN_SHARE`` of each sampled weight's smaller side (bf16 checkpoints always
    do, through their rounding). It is silent when the sampled weights have no delta,
    when too few directions are left, and when
    the models are not local safetensors folders (hub ids, ``model+lora``: see
    ``lora_lineage_error``). ``MERGEKIT_LSSF_ROLE_CHECK=0`` silences it on every path
    (merge, ``check``, ``report``, the demo).
    """
    if not role_check_enabled():
        return None
    indexes = [model_index(m) for m in (finetuned, aligned, unaligned)]
    if None in indexes or not names:
        return None
    positions: List[float] = []
    for name in names:
        stored = [index.get(name) for index in indexes]
        if None in stored or len({t.shape for t in stored}) != 1 or len(stored[0].shape) != 2:
            return None
        ft, al, un = (read_tensor(t).double() for t in stored)
        positions += delta_positions(ft, al, un)
    if len(positions) < SWAP_MIN_DIRECTIONS:
        return None
    median = statistics.median(positions)
    if median < SWAP_MEDIAN:
        return (
            f"lssf: WARNING: were the roles swapped? Along {len(positions)} directions of the safety vector "
            f"(W_aligned - W_unaligned, {len(names)} sampled weights), the fine-tune {finetuned} sits at a median "
            f"{median:.2f} of the way from {unaligned}, marked `role: unaligned` (0), to {aligned}, marked "
            "`role: aligned` (1). A fine-tune of the aligned model keeps its position along most of them, even "
            "where it erased its safety; with the roles swapped, LSSF subtracts the safety vector. Check the "
            "recipe (MERGEKIT_LSSF_ROLE_CHECK=0 silences this)."
        )
    return None


def role_check_enabled() -> bool:
    """False when ``MERGEKIT_LSSF_ROLE_CHECK=0``: the one switch of the role heuristic."""
    return os.environ.get("MERGEKIT_LSSF_ROLE_CHECK", "1").strip() != "0"


def delta_positions(ft: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor) -> List[float]:
    """``c_i`` of ``role_swap_warning`` for every singular direction of ``aligned -
    unaligned`` above ``1e-5 sigma_1`` (the rest is float32 round-off), from the Gram
    matrix of the smaller side (float64: milliseconds on k/v projections); none when
    fewer than ``SWAP_MIN_SHARE`` of the smaller side's directions carry delta (then
    the fine-tune can have undone every one of them, and a swap looks the same)."""
    delta, moved = (aligned - unaligned).double(), (ft - unaligned).double()
    if delta.shape[0] > delta.shape[1]:
        delta, moved = delta.T, moved.T
    if not bool(delta.any()):
        return []
    values, vectors = torch.linalg.eigh(delta @ delta.T)
    keep = values > values.max() * 1e-10
    if int(keep.sum()) < SWAP_MIN_SHARE * delta.shape[0]:
        return []  # a low-rank delta (e.g. a float32 LoRA alignment): no tail to tell a swap from erasure
    basis, squared = vectors[:, keep], values[keep]
    return (((basis.T @ moved) * (basis.T @ delta)).sum(1) / squared).tolist()


def lora_lineage_error(finetuned: Any, aligned: Any, unaligned: Any) -> None:
    """Refuse a ``base_model: BASE+LORA`` whose BASE is the model marked unaligned.

    The fine-tune's lineage is known here: the LoRA's base is in the recipe, and the
    adapter's ``adapter_config.json`` names the model it was trained on
    (``base_model_name_or_path``). A fine-tune to repair descends from the aligned
    model; with BASE the model marked ``role: unaligned`` the roles are swapped and LSSF
    would subtract the safety vector. Models match by path (as written or resolved),
    or, for two local folders, by ``subspace_file.model_fingerprint``. The adapter's
    declared base counts only when the recipe's BASE is not the aligned model. Hub ids
    are compared as written (nothing is downloaded). Not silenced by
    ``MERGEKIT_LSSF_ROLE_CHECK``: this is known, not guessed."""
    if getattr(finetuned, "lora", None) is None or getattr(unaligned, "lora", None) is not None:
        return
    base, other = finetuned.model.path, unaligned.model.path
    plain_aligned = aligned.model.path if getattr(aligned, "lora", None) is None else None
    if same_model(base, other):
        raise LSSFConfigError(
            f"base_model {finetuned} is a LoRA on {base}, the model marked `role: unaligned` ({unaligned}); "
            f"a fine-tune to repair descends from the model marked `role: aligned` ({aligned}): the roles look "
            "swapped (with them LSSF subtracts the safety vector); swap them in the recipe (nothing was written)"
        )
    declared = adapter_base(finetuned.lora.path)
    if declared and not (plain_aligned and same_model(base, plain_aligned)) and same_model(declared, other):
        raise LSSFConfigError(
            f"base_model {finetuned}: the adapter's adapter_config.json says it was trained on {declared}, the "
            f"model marked `role: unaligned` ({unaligned}); a fine-tune to repair descends from the model marked "
            f"`role: aligned` ({aligned}): the roles look swapped; swap them in the recipe (nothing was written)"
        )


def adapter_base(lora_path: str) -> Optional[str]:
    """``base_model_name_or_path`` of a local PEFT adapter folder, or None."""
    path = os.path.join(os.path.expanduser(lora_path), "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as fp:
            value = json.load(fp).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) and value else None


def same_model(a: str, b: str) -> bool:
    """Two model references name the same model: the same string, the same local folder
    once resolved, or two local folders with the same ``model_fingerprint``."""
    if a == b:
        return True
    da, db = os.path.expanduser(a), os.path.expanduser(b)
    if not (os.path.isdir(da) and os.path.isdir(db)):
        return False
    if os.path.realpath(da) == os.path.realpath(db):
        return True
    try:
        return model_fingerprint(da) == model_fingerprint(db)
    except (OSError, ValueError, KeyError):
        return False


def sample_names(shapes: Dict[str, tuple], is_candidate) -> List[str]:
    """Up to SWAP_SAMPLES fused-weight names of the smallest size (k/v projections in
    models with grouped-query attention), spread over the layers, so that the check
    reads a few MB even on a 70B model."""
    candidates = [(math.prod(shape), n) for n, shape in shapes.items() if len(shape) == 2 and is_candidate(n)]
    if not candidates:
        return []
    smallest = min(size for size, _ in candidates)
    names = sorted(n for size, n in candidates if size == smallest)
    step = max(len(names) // SWAP_SAMPLES, 1)
    return sorted({names[(len(names) // 2 + i * step) % len(names)] for i in range(SWAP_SAMPLES)})


def model_index(model: Any) -> Optional[Dict[str, StoredTensor]]:
    """name -> StoredTensor of a local safetensors model, from its headers alone; None
    for a ``model+lora`` reference, a hub id or a folder without safetensors files."""
    if getattr(model, "lora", None) is not None or not os.path.isdir(model.model.path):
        return None
    return folder_index(model.model.path) or None
