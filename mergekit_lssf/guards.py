"""Checks that protect the user before anything is written: model folders that do not
exist, output folders that already hold a model, and a recipe whose roles look swapped.

Reads only file listings, safetensors headers and, for the role check, a handful of
tensors. No mergekit import: model references are the ones callers pass in.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Any, Dict, Iterable, List, Optional

from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import StoredTensor, folder_index, read_tensor

#: Files whose presence means a folder already holds model weights.
MODEL_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
#: How much closer to the marked-unaligned model a fine-tune must be to warn.
SWAP_RATIO = 0.8
#: Fused weights sampled for the role check.
SWAP_SAMPLES = 4


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


def check_output_folder(folder: str, patterns: Iterable[str] = MODEL_FILES, what: str = "model weights") -> None:
    """Refuse an output folder that already holds files we would overwrite or leave
    stale beside the new ones; nothing is deleted."""
    found = existing_files(folder, patterns)
    if found:
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} files)" if len(found) > 6 else "")
        raise LSSFConfigError(
            f"output folder {folder} already holds {what} ({shown}); choose an empty or new "
            "folder, or remove them yourself (nothing was written or deleted)"
        )


def role_swap_warning(finetuned: Any, aligned: Any, unaligned: Any, names: List[str]) -> Optional[str]:
    """A warning when the fine-tune is clearly closer to the model marked unaligned.

    The fine-tune is normally a descendant of the aligned model, so
    ``||W_ft - W_aligned|| < ||W_ft - W_unaligned||``. With the roles swapped the
    inequality turns round and the merge would subtract the safety vector. Compares
    the summed distances over a few fused weights (``names``, from the middle of the
    model); warns when ``d(ft, unaligned) < SWAP_RATIO * d(ft, aligned)``. It can be
    wrong when the fine-tune really undid the alignment (walked back to the unaligned
    weights), and it cannot tell when the drift dwarfs the safety vector (then it is
    silent). Returns None when the models are not local safetensors folders.
    """
    if os.environ.get("MERGEKIT_LSSF_ROLE_CHECK", "1") == "0":
        return None
    indexes = [model_index(m) for m in (finetuned, aligned, unaligned)]
    if None in indexes or not names:
        return None
    d_aligned = d_unaligned = 0.0
    for name in names:
        stored = [index.get(name) for index in indexes]
        if None in stored or len({t.shape for t in stored}) != 1:
            return None
        ft, al, un = (read_tensor(t).double() for t in stored)
        d_aligned += float((ft - al).square().sum())
        d_unaligned += float((ft - un).square().sum())
    d_aligned, d_unaligned = d_aligned ** 0.5, d_unaligned ** 0.5
    if d_unaligned < SWAP_RATIO * d_aligned:
        return (
            f"lssf: WARNING: were the roles swapped? The fine-tune {finetuned} is closer to "
            f"{unaligned}, marked `role: unaligned` (distance {d_unaligned:.4g}), than to "
            f"{aligned}, marked `role: aligned` (distance {d_aligned:.4g}), on {len(names)} "
            "sampled weights. A fine-tune normally descends from the aligned model; with the "
            "roles swapped, LSSF subtracts the safety vector. Check the recipe (ignore this if "
            "the fine-tune really walked back to the unaligned weights; "
            "MERGEKIT_LSSF_ROLE_CHECK=0 silences it)."
        )
    return None


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
