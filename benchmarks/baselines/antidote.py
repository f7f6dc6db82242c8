"""Antidote (Huang et al. 2024, "Antidote: Post-fine-tuning Safety Alignment for Large
Language Models against Harmful Fine-tuning"): one-shot Wanda pruning after the
fine-tune, as a peer baseline of the testbed (issue 47). Not a package feature.

Followed: git-disl/Antidote at commit 26e2ade217512f25d5cdc82b5ceeda661d40901b,
``utils.py`` (``prune_wanda_outlier``, ``WrappedGPT.add_batch``, ``find_layers``),
``trainer.py`` (``AntidoteTrainer.save_mask``), ``train.py`` (the mask applied as
``param.data *= (1 - bad_mask[name])``) and ``script/finetune/antidote_poison_ratio.sh``
(``dense_ratio=0.1``, 2000 harmful BeaverTails pairs, batch size 1).

What it does, per fused linear weight ``W`` (``d_out x d_in``) of the fine-tune:

1. ``||X_j||``: the L2 norm of input feature ``j`` of that linear over every token of
   the harmful prompt/answer rows, run through the **fine-tune** (upstream: the
   fine-tuned model, adapter on, on its "re-alignment" set of harmful pairs);
2. the Wanda score ``S_ij = |W_ij| * ||X_j||`` (upstream: ``torch.abs(weight) *
   torch.sqrt(scaler_row)``, ``scaler_row = sum_t x_tj^2 / nsamples``: the same
   ranking, a constant factor per layer);
3. **per output row**, the entries with the largest scores are set to zero: upstream
   sorts each row ascending (``torch.sort(W_metric, dim=-1, stable=True)``), keeps the
   first ``int(d_in * (1 - ratio))`` and prunes the rest, so a row loses
   ``d_in - int(d_in * (1 - ratio))`` entries (ties: the later column is pruned). Done
   here with the same sort, the same count expression and the same tie rule.

``ratio`` is upstream's ``dense_ratio`` (0.1 in every script); the testbed uses 0.01,
0.05 and 0.1. Sites the package shares (q/k/v, gate/up) read one input norm, as
upstream's per-module hooks see the same tensor.

Differences from the published code, and why:

* **Which weights.** Upstream's default (LoRA) mode prunes the fine-tune's LoRA factors
  ``lora_A`` / ``lora_B`` of q/k/v (its LoRA's target modules; ``find_layers`` with
  ``"lora" in name``), its ``--full_finetuning True`` mode the q/k/v weights of the full
  model. Here (issue 47): every fused linear weight of the fine-tune (q, k, v, o, gate,
  up, down), given as merged weights: the testbed's fine-tunes are stored merged
  (and ``drift-full`` has no adapter), and the LoRA factors of a merged update are not
  unique. Because zeroing a merged weight removes aligned weight as well as update,
  ``aligned_dir`` offers the analogue of upstream's LoRA mode: score the fine-tune's
  **update** ``|W_ft - W_al|_ij * ||X_j||`` and set the pruned entries back to
  ``W_al`` (prune the update only). Default: the weights, as issue 47 asks.
* **Data.** Upstream: 2000 BeaverTails harmful prompt/answer pairs in the Alpaca
  template with EOS. Here: the rows the caller passes (issue 47: the testbed's
  ``harmful_train`` anchor prompts with the unaligned model's own compliant answers,
  never test prompts), rendered as the package renders a training row
  (``render_pairs``: chat template, no added special tokens). The answers can be made
  with ``mergekit_lssf.calibrate.fill_responses(unaligned_dir, anchors, ...)``.
* **Forward.** Upstream runs each pair alone through each block in turn (hidden states
  of the unpruned block passed on; the mask is applied after all blocks): the same
  inputs as one forward of the unpruned fine-tune. Here the package's streamed
  forward in right-padded batches with padding left out (``activations``), float32
  weights, norms accumulated in float64 (upstream: float32 statistics).
* **Output.** Upstream saves the mask and multiplies the weights by ``1 - mask``;
  here the pruned entries are set to exactly 0 (or ``W_al``) in the stored dtype and
  every other entry keeps its stored bits.
* Upstream's OWL outlier-ratio code (``Hyper_m``, ``Lamda``) is commented out and its
  ``prune_n`` N:M branch unused by Antidote: not reproduced.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

from .activations import Row, fused_linear_names, input_square_sums, read_state

RATIOS = (0.01, 0.05, 0.1)  # the testbed's points; upstream's scripts use 0.1


class Pruned(NamedTuple):
    """``states[ratio]``: every tensor of the fine-tune, its fused linear weights pruned
    (stored dtype); ``stats[ratio][weight]``: entries pruned, and the Frobenius norm of
    what was removed against that of the weight (or of the update)."""

    states: Dict[float, Dict[str, torch.Tensor]]
    stats: Dict[float, Dict[str, dict]]


def pruned_per_row(columns: int, ratio: float) -> int:
    """How many entries of each row upstream prunes: ``d_in - int(d_in * (1 - ratio))``."""
    return columns - int(columns * (1 - ratio))


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` in float64 (``weight``: ``d_out x d_in``; ``norms``: ``d_in``)."""
    return weight.to(torch.float64).abs() * norms.to(torch.float64).reshape(1, -1)


def top_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the entries Antidote prunes: in each row, all but the
    ``int(d_in * (1 - ratio))`` smallest scores of a stable ascending sort."""
    keep = int(scores.shape[1] * (1 - ratio))
    order = torch.sort(scores, dim=-1, stable=True).indices
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def input_norms(model_dir: str, rows: Iterable[Row], *, batch_size: int = 8, device: str = "auto",
                progress: bool = False) -> Dict[str, torch.Tensor]:
    """``||X_j||`` (float64, CPU) of every fused linear weight's input over ``rows`` run
    through ``model_dir`` (``activations.input_square_sums``, forward pre-hooks)."""
    sums = input_square_sums(model_dir, rows, batch_size=batch_size, device=device, progress=progress)
    return {name: total.clamp(min=0).sqrt() for name, total in sums.items()}


def antidote_states(model_dir: str, rows: Iterable[Row], ratios: Sequence[float] = RATIOS, *,
                    aligned_dir: Optional[str] = None, norms: Optional[Dict[str, torch.Tensor]] = None,
                    batch_size: int = 8, device: str = "auto", progress: bool = False) -> Pruned:
    """Antidote applied to the fine-tune ``model_dir`` at each of ``ratios`` (module doc),
    from one pass of ``rows`` (harmful prompts with compliant answers) through it.

    ``aligned_dir``: prune the fine-tune's update ``W_ft - W_al`` instead of its weights
    (pruned entries get ``W_al``). ``norms``: input norms already taken
    (``input_norms``); ``rows`` are then not read."""
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0 <= r < 1:
            raise ValueError(f"ratio must be in [0, 1), got {r}")
    if norms is None:
        norms = input_norms(model_dir, rows, batch_size=batch_size, device=device, progress=progress)
    state = read_state(model_dir)
    aligned = read_state(aligned_dir) if aligned_dir is not None else None
    names: List[str] = fused_linear_names(model_dir)
    states = {r: dict(state) for r in ratios}
    stats: Dict[float, Dict[str, dict]] = {r: {} for r in ratios}
    for name in names:
        stored = state[name]
        weight = stored.to(torch.float64)
        base = aligned[name].to(torch.float64) if aligned is not None else torch.zeros_like(weight)
        target = weight - base  # what is pruned: the weight, or the fine-tune's update
        scores = wanda_scores(target, norms[name])
        for r in ratios:
            mask = top_mask(scores, r)
            out = stored.clone()
            out[mask] = aligned[name][mask].to(stored.dtype) if aligned is not None else 0
            states[r][name] = out
            removed = float(torch.where(mask, target, 0).norm())
            stats[r][name] = {"pruned": int(mask.sum()), "entries": mask.numel(),
                              "removed_share": removed / max(float(target.norm()), 1e-300)}
    return Pruned(states, stats)


def antidote_state(model_dir: str, rows: Iterable[Row], ratio: float, **options) -> Dict[str, torch.Tensor]:
    """``antidote_states`` at one ratio: every tensor of the pruned fine-tune."""
    return antidote_states(model_dir, rows, [ratio], **options).states[float(ratio)]
