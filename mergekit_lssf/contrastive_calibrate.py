"""``mergekit-lssf calibrate RECIPE --task TASK.jsonl``: the contrastive calibration.

The fine-tune (the recipe's ``base_model``) reads two sets, each row rendered as
training renders it (``apply_chat_template([user, assistant], tokenize=False)``, then
tokenised without added special tokens, so identical rows give identical Grams):

* the anchors: harmful prompts with the **aligned** model's own answers (its refusals);
* the task rows ``{"prompt", "answer"}`` (without ``--task``: the shipped benign
  ``train`` prompts answered by the fine-tune, the "benign-only" variant).

For every linear input site (q/k/v share one, gate/up another) it accumulates the
input Grams ``C_H`` (anchors) and ``C_T`` (task) in float64, trace-normalises them and
stores the leading generalized eigenvectors of ``(C_H, C_T + eps I)`` with every
eigenvalue (``contrastive.contrastive_basis``) in a ``contrastive_file`` file, and
how much of ``sum(mu)`` the vectors ``--max-rank`` dropped carry. Blocks are
streamed one at a time (``calibrate.blocks``): peak memory is one decoder block, its
Grams and the hidden states of both sets.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Tuple

import torch
from transformers import AutoTokenizer

from mergekit_lssf.calibrate import (
    Anchor,
    _Statistics,
    anchors_sha256,
    blocks,
    embed_batches,
    fill_responses,
    jsonl_objects,
    load_anchors,
    open_streamed,
    run_through,
)
from mergekit_lssf.contrastive import contrastive_basis, dropped_share, identity_gram, trace_normalised
from mergekit_lssf.contrastive_file import FORMAT, NORMALIZATION
from mergekit_lssf.evaluate import has_tokenizer, is_refusal
from mergekit_lssf.guards import check_model_folder
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.recipe import check_cached_lora_merge
from mergekit_lssf.safetensors_io import StreamedWriter
from mergekit_lssf.subspace_file import adapter_sha256, model_fingerprint
from mergekit_lssf.version import __version__


@dataclass(frozen=True)
class Roles:
    """The two models a contrastive calibration reads, from the recipe: ``finetuned`` a
    local folder (for ``BASE+LORA``, mergekit's merged folder in the LoRA merge cache,
    with ``base`` and ``adapter`` the recipe's BASE and LORA folders) and ``aligned``."""

    finetuned: str
    aligned: str
    base: Optional[str] = None
    adapter: Optional[str] = None

    @property
    def tokenizer(self) -> str:
        """The adapter's tokenizer when it saved one, else BASE's, else the fine-tune's."""
        for folder in (self.adapter, self.base):
            if folder and has_tokenizer(folder):
                return folder
        return self.finetuned

    def lineage(self) -> Dict[str, str]:
        """The fine-tune's provenance: its fingerprint, or for ``BASE+LORA`` BASE's
        fingerprint and the adapter's hash (``adapter_sha256``)."""
        if self.adapter is None:
            return {"finetuned_fingerprint": model_fingerprint(self.finetuned)}
        return {"finetuned_base_fingerprint": model_fingerprint(self.base),
                "finetuned_adapter_sha256": adapter_sha256(self.adapter)}


def recipe_models(config, lora_merge_cache: Optional[str] = None) -> Roles:
    """The fine-tune (``base_model``) and the ``role: aligned`` model of an lssf recipe,
    as local folders; a ``BASE+LORA`` fine-tune is merged by mergekit into
    ``lora_merge_cache`` (the same folder ``mergekit-yaml --lora-merge-cache`` uses)."""
    base = config.base_model
    if base is None:
        raise LSSFConfigError("calibrate: the recipe has no `base_model` (the fine-tune to repair)")
    aligned = [m.model for m in config.models or [] if (m.parameters or {}).get("role") == "aligned"]
    if len(aligned) != 1:
        raise LSSFConfigError(f"calibrate: the recipe needs exactly one model with `role: aligned`, has {len(aligned)}")
    if getattr(aligned[0], "lora", None) is not None:
        raise LSSFConfigError(f"calibrate: the aligned model {aligned[0]} is a model+lora reference; give the "
                              "aligned model as a plain folder")
    check_model_folder(base.model.path, "base_model", local=True)
    check_model_folder(aligned[0].model.path, "models (role: aligned)", local=True)
    if getattr(base, "lora", None) is None:
        return Roles(base.model.path, aligned[0].model.path)
    check_model_folder(base.lora.path, "base_model (LoRA)", local=True)
    if not lora_merge_cache:
        raise LSSFConfigError(f"base_model: {base} is a model+lora reference; pass --lora-merge-cache DIR (the folder "
                              "mergekit-yaml uses: the adapter is merged there once)")
    check_cached_lora_merge(base, lora_merge_cache, "base_model")
    merged = base.merged(cache_dir=lora_merge_cache)
    return Roles(merged.model.path, aligned[0].model.path, base.model.path, base.lora.path)


def load_task(path: str) -> List[Anchor]:
    """The task rows of ``path`` (JSONL, ``{"prompt": ..., "answer": ...}``) as
    (prompt, response) pairs; a bad line is a one-line error naming the file and line."""
    if not os.path.isfile(path):
        raise LSSFConfigError(f"--task: no such file {path}")
    rows = []
    for number, row in jsonl_objects(path, "not a JSON object (the task file is JSONL)"):
        for field in ("prompt", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise LSSFConfigError(f"{path}:{number}: the row has no \"{field}\" string")
        rows.append(Anchor(row["prompt"], row["answer"]))
    if not rows:
        raise LSSFConfigError(f"{path}: no task rows")
    return rows


def benign_rows() -> List[Anchor]:
    """The shipped benign ``train`` prompts (no answers yet): the benign-only variant."""
    text = resources.files("mergekit_lssf").joinpath("data/benign/prompts.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Anchor(r["prompt"]) for r in rows if r.get("split") == "train"]


def render_pairs(tokenizer, rows: List[Anchor]) -> List[List[int]]:
    """Token ids of each (prompt, response) row as training renders it: the chat
    template's text of one user and one assistant turn, tokenised without added
    special tokens."""
    ids = []
    for row in rows:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.response}], tokenize=False)
        ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return ids


def check_options(out_path: str, eps: float, max_rank: Optional[int], batch_size: int) -> None:
    """The options of a contrastive calibration, before anything runs (one line each)."""
    if os.path.exists(out_path):
        raise LSSFConfigError(f"--out: {out_path} already exists; choose a new file (nothing was written)")
    if not (eps > 0 and math.isfinite(eps)):
        raise LSSFConfigError(f"--eps must be a finite number > 0, got {eps}")
    if (max_rank is not None and max_rank < 1) or batch_size < 1:
        raise LSSFConfigError("--max-rank and --batch-size must be >= 1")


def contrastive_calibrate(roles: Roles, out_path: str, *, task: Optional[List[Anchor]] = None,
                          anchors_path: Optional[str] = None, max_rank: Optional[int] = 256, eps: float = 1e-6,
                          device: str = "auto", batch_size: int = 8, max_new_tokens: int = 64,
                          keep_control: bool = False, progress: bool = True, log=print) -> Dict:
    """Write the contrastive calibration of ``roles.finetuned`` against
    ``roles.aligned``'s refusals to ``out_path``; returns the metadata (with the time
    in seconds and the peak resident memory in MiB, and ``truncation``: a sentence on
    what the dropped vectors carry). ``task``: the task rows (``load_task``; None: the
    benign-only variant). ``max_rank`` None keeps every eigenvector; every eigenvalue
    is stored whatever it is. ``keep_control``: write the control ``C_H = I / d_in``
    ("roll back every direction the task does not use", ``identity_gram``) instead of
    the anchors' Gram, for studies; the anchors are still answered and recorded."""
    check_options(out_path, eps, max_rank, batch_size)
    anchors = load_anchors(anchors_path)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    started = time.perf_counter()
    anchors = fill_responses(roles.aligned, anchors, device=dev, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress)
    refused = sum(is_refusal(a.response) for a in anchors)
    if refused < len(anchors) / 2:
        log(f"calibrate: warning: the aligned model refuses only {refused} of {len(anchors)} anchors; the harmful "
            "directions then come from answers that are not refusals")
    variant = "task" if task is not None else "benign-only"
    if task is None:
        task = fill_responses(roles.finetuned, benign_rows(), device=dev, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, progress=progress, tokenizer_dir=roles.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(roles.tokenizer)
    sets = {"anchors": render_pairs(tokenizer, anchors), "task": render_pairs(tokenizer, task)}

    config, body, rotary, weights = open_streamed(roles.finetuned, dev)
    batches = {k: embed_batches(weights, config, ids, batch_size, dev) for k, ids in sets.items()}
    sites: Dict[str, str] = {}
    dropped: Dict[str, float] = {}  # site -> share of sum(mu) its dropped vectors carry
    writer = StreamedWriter(out_path)
    try:
        for _index, prefix, block, forward in blocks(config, body, rotary, weights, dev, progress):
            grams = _block_grams(block, prefix, forward, batches)
            for owner, (g_h, g_t) in grams["sites"].items():
                try:
                    c_t = trace_normalised(g_t)
                    c_h = identity_gram(c_t.shape[0], c_t.device) if keep_control else trace_normalised(g_h)
                except ValueError as error:
                    raise LSSFConfigError(f"calibrate: input site {owner}: {error}") from None
                basis = contrastive_basis(c_h, c_t, eps=eps, k=max_rank)
                dropped[owner] = dropped_share(basis.spectrum, basis.rank)
                writer.add({f"{owner}.V": basis.v.cpu(), f"{owner}.BV": basis.bv.cpu(),
                            f"{owner}.mu": basis.spectrum.cpu()})  # every eigenvalue: width floats
            sites.update(grams["owners"])
        metadata = {
            "format": FORMAT,
            "sites": json.dumps(sites, sort_keys=True),
            "finetuned": os.path.abspath(roles.adapter or roles.finetuned),
            **roles.lineage(),
            "aligned": os.path.abspath(roles.aligned),
            "aligned_fingerprint": model_fingerprint(roles.aligned),
            "task": variant,
            "harmful_gram": "identity" if keep_control else "anchors",
            "task_sha256": anchors_sha256(task),
            "anchors_sha256": anchors_sha256(anchors),
            "anchors": str(len(anchors)),
            "task_rows": str(len(task)),
            "anchor_tokens": str(sum(map(len, sets["anchors"]))),
            "task_tokens": str(sum(map(len, sets["task"]))),
            "eps": repr(float(eps)),
            "normalization": NORMALIZATION,
            "max_rank": "full" if max_rank is None else str(max_rank),
            **_dropped_metadata(dropped),
            "version": __version__,
        }
        writer.finish(metadata)
    except BaseException:
        writer.close()
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    truncation = truncation_words(metadata)
    return {**metadata, "sites_count": len(set(sites.values())), "seconds": round(time.perf_counter() - started, 2),
            "peak_mib": round(peak), "bytes": os.path.getsize(out_path), "truncation": truncation}


def _dropped_metadata(dropped: Dict[str, float]) -> Dict[str, str]:
    """``dropped_mu_share``: the largest share of ``sum(mu)`` that one site's dropped
    vectors carry (``repr`` of a float), and ``dropped_mu_site``: that site."""
    site = max(sorted(dropped), key=lambda s: dropped[s], default="")
    share = dropped.get(site, 0.0)
    return {"dropped_mu_share": repr(share), "dropped_mu_site": site if share > 0 else ""}


def truncation_words(metadata: Dict[str, str]) -> str:
    """What ``--max-rank`` left out, for the summary: the largest share of ``sum(mu)``
    the dropped vectors carry at one site, and which site."""
    share = float(metadata.get("dropped_mu_share", "0"))
    if share <= 0:
        return f"k {metadata['max_rank']}: every vector with a nonzero mu is stored (nothing of sum(mu) dropped)"
    return (f"k {metadata['max_rank']}: the dropped vectors carry at most {100 * share:.3g}% of sum(mu) (site "
            f"{metadata['dropped_mu_site']}); `--max-rank full` keeps them all")


def _block_grams(block, prefix: str, forward, batches: Dict[str, List[tuple]]) -> Dict:
    """``{"sites": {owner: (G_H, G_T)}, "owners": {weight: owner}}`` of one block: the
    raw float64 input Grams of each input site over the anchors and the task rows."""
    stats = _Statistics(block, prefix, raw=True)
    with torch.no_grad():
        first = batches["anchors"][0]
        stats.discover(lambda: forward(first[0], first[2]))
        per_set: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, set_batches in batches.items():
            stats.grams = {}
            run_through(forward, set_batches, stats)
            per_set[name] = stats.grams
    stats.close()
    owners = dict(stats.owner)
    sites: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {
        owner: (per_set["anchors"][owner], per_set["task"][owner]) for owner in sorted(set(owners.values()))}
    return {"sites": sites, "owners": owners}
