"""Safe Delta (Lu et al., ICML 2025, "Safe Delta: Consistently Preserving Safety when
Fine-Tuning LLMs on Diverse Datasets"), as a peer baseline of the testbed (issue 47).
Not a package feature.

Followed: ColinLu50/SafeDelta at commit 3a4ea3571fa7ec1b2597e0b34c70103dcd146ca6,
``llama2/safedelta/safedelta_runner.py`` (``SafeDeltaRunner.add_batch`` and
``adjust_delta``, adapted by its authors from IST-DASLab/sparsegpt) and
``llama2/run_safedelta.py`` (``run_safedelta``: 128 harmful instructions with safe
answers, ``percdamp=0.01``, ``blocksize=2048``, ``--scale 0.1`` / ``0.11`` in the scripts).

The algorithm, per linear weight (``d_out x d_in``), with ``W_al`` the aligned weight,
``W_ft`` the fine-tune's and ``delta = W_ft - W_al``:

1. ``H = (2 / n_rows) sum_t x_t x_t^T`` over every token of the safety rows (harmful
   prompts with refusals) run through the **aligned** model (upstream: inputs of the
   aligned layer, passed on through the unmodified aligned block). Dead inputs
   (``H_jj = 0``) get ``H_jj = 1``; then ``H += percdamp * mean(diag H) I``.
2. ``U`` = the upper Cholesky factor of ``H^-1`` (``cholesky``, ``cholesky_inverse``,
   ``cholesky(upper=True)``, as SparseGPT): ``U_jj^2 = [H[j:, j:]^-1]_00`` is the OBS
   inverse-Hessian diagonal once the columns before ``j`` are fixed, and row ``j`` of
   ``U`` carries the OBS compensation of the columns after ``j``.
3. The columns are walked in blocks of ``blocksize``. At the start of a block (``W``:
   the aligned weight with the compensations of earlier blocks), every entry of the
   block gets its OBS safety cost ``loss_ij = (W_ft_ij - W_ij)^2 / U_jj^2`` and its
   column's cost per unit of squared change ``c_j = 1 / U_jj^2`` (upstream's ``tmp``,
   commented "1 / [h^-1]mm"). Entries are sorted by ``c_j`` ascending (the cheapest
   columns first, whatever the size of the change); the last
   ``int(exclude * entries)`` of that order (the most safety-sensitive columns,
   upstream: 15%) are never kept; along the rest, entries are kept while the running
   sum of ``loss`` stays within the block's budget (a prefix of the order).
4. SparseGPT's sequential OBS pass over the block's columns: a kept entry is set to
   ``W_ft_ij``, any other keeps its current (compensated) value; the error
   ``err_ij = (W_ij - q_ij) / U_jj`` is propagated to every later column,
   ``W[:, k] -= err_j U_jk`` (lazily, in sub-blocks, as SparseGPT).

The realized safety loss is ``||E||_F^2 = tr((W' - W_al) H (W' - W_al)^T)`` with ``E``
the errors of step 4 (``W' = W_al - E U``, ``U H U^T = I``). Limits (derived, and tested
in ``tests/test_baselines.py``): budget 0 keeps nothing but entries of zero cost (those
with ``delta_ij = 0``, which change nothing) and gives back ``W_al`` exactly; a budget
that keeps every candidate gives ``W_ft`` exactly on the candidates, and with
``exclude = 0`` gives ``W_ft`` exactly; with upstream's ``exclude = 0.15`` the excluded
columns keep ``W_al`` plus the OBS compensation of the kept ones, so no budget gives
back ``W_ft``. What grows with the budget: within one block (every weight of a
135M model: ``d_in <= 2048``) the kept entries are a prefix of a fixed order, so they
are nested and their summed loss (what the budget bounds, ``predicted_loss``) grows.
The realized loss ``||E||^2`` need **not** grow: a kept entry's compensation can move
a later kept entry toward ``W_ft`` (6 x 11 random layers: it fell somewhere along 41
evenly spaced budgets in 325 of 400 cases; along 0, 0.01, 0.03, 0.1, 0.3, 1 it grew in
all 50 one-block cases tried). With several
blocks, a later block's costs depend on the earlier blocks' compensation, so only the
first block's kept set is nested.

The budget. Upstream's is absolute: per block ``(s / 2) * (d_out / 4096) * mean(c)``,
the "2" being ``4096 / blocksize`` for Llama-2-7B's 4096 columns, so in effect
``s * (d_out / 4096) * (count / 4096) * mean(c)`` with ``count`` the block's columns.
Its meaning depends on the size of ``delta`` (it is a squared-weight scale: ``s /
4096^2`` times the summed costs), so ``s`` = 0.1 on Llama-2-7B says nothing about a
135M model. Here ``budget_mode="relative"`` (default): the block's budget is
``budget`` times the summed loss of all its candidate entries, ``0 <= budget <= 1``:
0 gives ``W_al``, 1 keeps every candidate. Sensible range: log-spaced between about
0.01 and 1. How many entries a budget keeps depends on how unequal the columns' costs
are (cheap columns first): on a generated 135M model (SmolLM2's shapes, random
weights and activations) 0.01 kept 1.2% of the entries, 0.1 kept 11%, 1 kept 85%
(``stats[...]["kept"]`` says it per weight); real activations, with a few dominant
features, should keep more at a small budget. Place the testbed's three budgets on
validation, as the other curves are: sweep {0.01, 0.03, 0.1, 0.3, 1} on the validation
split and keep three that span the utility kept between the aligned model's and the
fine-tune's. ``budget_mode="upstream"`` takes upstream's ``s`` with the formula above
(identical to upstream for 2048-column blocks).

Differences from the published code, and why:

* float64 throughout on the weights and ``H`` (upstream: float32, TF32 off): the
  greedy cut and the triangular solves are then reproducible to the last bits and
  match the float64 reference of the tests.
* A stable sort of the costs, ties (the entries of one column) in row order; upstream's
  ``torch.argsort`` is not stable, so which rows of the column at the budget's edge
  are kept is arbitrary there.
* The excluded tail is ``order[: n - int(exclude * n)]``; upstream writes
  ``order[0:-int(0.15 * n)]``, which is empty when ``int(0.15 * n) == 0`` (blocks of
  fewer than 7 entries).
* The upstream budget of a block is ``(s / 2) * (d_out / 4096) * mean(c)`` whatever its
  width; here the ``count / 4096`` form, equal for full 2048-column blocks, smaller for
  a last partial block (upstream gives down_proj's 768-column tail a full block's
  budget) and meaningful for models narrower than 2048. The default budget is relative
  (above).
* Sub-blocks of the OBS pass: 128 columns (upstream: 4); the arithmetic is the same,
  up to rounding.
* Inputs: the rows the caller passes (issue 47: harmful prompts with the aligned
  model's refusals, never test prompts) rendered as the package renders a training row
  (``render_pairs``) and run through the aligned model with the package's streamed
  forward (``activations``). Upstream: 128 self-generated harmful/safe pairs in the
  Llama-2 ``[INST]`` format with four system prompts.
* Which weights: the package's fused linear weights (q, k, v, o, gate, up, down for a
  Llama-layout model); upstream: every ``nn.Linear`` of every decoder layer: the same
  set here.
* Output: the repaired weight is cast once to the fine-tune's stored dtype (the
  testbed's bf16: compensations below bf16's resolution are lost, as they are in
  upstream's float16 save).
* Upstream's ``st_layer`` (start at a later decoder layer; default 0) is not offered.
"""

from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

from .activations import Row, as_rows, block_input_grams, read_state

BUDGET_MODES = ("relative", "upstream")
UPSTREAM_WIDTH = 4096  # Llama-2-7B's hidden size, in upstream's budget


class Repaired(NamedTuple):
    """``states[budget]``: every tensor of the fine-tune, its fused linear weights
    repaired (stored dtype); ``stats[budget][weight]``: ``safedelta_layer``'s figures."""

    states: Dict[float, Dict[str, torch.Tensor]]
    stats: Dict[float, Dict[str, dict]]


def inverse_factor(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """``U``, upper triangular with ``U^T U = (H + damp I)^-1`` (float64): dead inputs
    (``H_jj = 0``) get ``H_jj = 1``, then ``damp = percdamp * mean(diag H)``."""
    h = h.to(torch.float64).clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def block_budget(budget: float, mode: str, candidate_losses: torch.Tensor, costs: torch.Tensor, rows: int,
                 count: int) -> float:
    """The safety budget of one block: ``budget`` times the summed loss of its candidate
    entries (``relative``), or upstream's ``s * (d_out / 4096) * (count / 4096) *
    mean(c)`` over the block's entries (``upstream``)."""
    if mode == "relative":
        return budget * float(candidate_losses.sum()) if candidate_losses.numel() else 0.0
    if mode == "upstream":
        return budget * (rows / UPSTREAM_WIDTH) * (count / UPSTREAM_WIDTH) * float(costs.mean())
    raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {mode!r}")


def safedelta_layer(w_al: torch.Tensor, w_ft: torch.Tensor, h: torch.Tensor, budget: float, *,
                    budget_mode: str = "relative", blocksize: int = 2048, exclude: float = 0.15,
                    percdamp: float = 0.01, factor: Optional[torch.Tensor] = None, lazy: int = 128
                    ) -> Tuple[torch.Tensor, dict]:
    """Safe Delta on one weight (module doc): returns the repaired weight (float64) and
    ``{"kept", "entries", "predicted_loss", "candidate_loss", "loss"}``: entries kept
    from the fine-tune, entries in all, the summed block losses of the kept entries
    (what the budget bounds), those of every candidate, and the realized loss
    ``||E||_F^2``. ``h``: upstream's ``H`` (``2 / n_rows`` times the input Gram) of this
    weight's input through the aligned model; ``factor``: ``inverse_factor(h)`` when
    already computed (it is then used instead of ``h``)."""
    if budget < 0 or budget != budget:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0 <= exclude < 1:
        raise ValueError(f"exclude must be in [0, 1), got {exclude}")
    u = inverse_factor(h, percdamp) if factor is None else factor.to(torch.float64)
    w = w_al.to(torch.float64).clone()
    target = w_ft.to(torch.float64)
    rows, cols = w.shape
    kept = predicted = candidate_total = realized = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1, w2, u1 = w[:, i1:i2].clone(), target[:, i1:i2], u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        costs = (1.0 / d ** 2).reshape(1, -1).expand(rows, count)
        loss = ((w2 - w1) ** 2 / d.reshape(1, -1) ** 2).flatten()
        order = torch.sort(costs.flatten(), stable=True).indices
        candidates = order[: loss.numel() - int(exclude * loss.numel())]
        cumulative = torch.cumsum(loss[candidates], 0)
        limit = block_budget(budget, budget_mode, loss[candidates], costs, rows, count)
        if budget_mode == "relative" and budget >= 1 and cumulative.numel():
            limit = float(cumulative[-1])  # every candidate, whatever the rounding of the sum
        chosen = cumulative <= limit
        mask = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
        mask[candidates[chosen]] = True
        mask = mask.reshape(rows, count)
        kept += int(chosen.sum())
        predicted += float(loss[candidates[chosen]].sum())
        candidate_total += float(loss[candidates].sum())
        errors = _obs_pass(w1, w2, mask, u1, lazy)
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ u[i1:i2, i2:]
        realized += float((errors ** 2).sum())
    return w, {"kept": int(kept), "entries": rows * cols, "predicted_loss": predicted,
               "candidate_loss": candidate_total, "loss": realized}


def _obs_pass(w1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor, u1: torch.Tensor, lazy: int) -> torch.Tensor:
    """SparseGPT's sequential OBS pass over one block, in place on ``w1``: column by
    column, kept entries (``mask``) set to ``w2``, the error ``(w - q) / U_jj``
    propagated to the later columns of the block (lazily, ``lazy`` columns at a time);
    returns the errors ``E``. Works on transposed copies so that a column is contiguous."""
    wt, targett, maskt = w1.T.contiguous(), w2.T.contiguous(), mask.T.contiguous()
    errors = torch.zeros_like(wt)
    touched = maskt.any(dim=1).tolist()  # columns with nothing kept: q = w, no error
    count = wt.shape[0]
    for j1 in range(0, count, lazy):
        j2 = min(j1 + lazy, count)
        for j in range(j1, j2):
            if not touched[j]:
                continue
            q = torch.where(maskt[j], targett[j], wt[j])
            err = (wt[j] - q) / u1[j, j]
            wt[j] = q
            wt[j + 1:j2] -= u1[j, j + 1:j2].reshape(-1, 1) * err.reshape(1, -1)
            errors[j] = err
        wt[j2:] -= u1[j1:j2, j2:].T @ errors[j1:j2]
    w1.copy_(wt.T)
    return errors.T


def safedelta_states(aligned_dir: str, finetuned_dir: str, rows: Iterable[Row], budgets: Sequence[float], *,
                     budget_mode: str = "relative", blocksize: int = 2048, exclude: float = 0.15,
                     percdamp: float = 0.01, batch_size: int = 8, device: str = "auto", progress: bool = False
                     ) -> Repaired:
    """Safe Delta of the fine-tune ``finetuned_dir`` against ``aligned_dir`` at each of
    ``budgets`` (module doc), from one pass of ``rows`` (harmful prompts with the
    aligned model's refusals) through the aligned model, one decoder block at a time
    (each block's ``H`` freed after use). Computed on ``device`` in float64; each
    repaired weight cast to the fine-tune's stored dtype."""
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
    budgets = [float(b) for b in budgets]
    rows = as_rows(rows)
    aligned, finetuned = read_state(aligned_dir), read_state(finetuned_dir)
    states = {b: dict(finetuned) for b in budgets}
    stats: Dict[float, Dict[str, dict]] = {b: {} for b in budgets}
    for _prefix, grams, owner in block_input_grams(aligned_dir, rows, batch_size=batch_size, device=device,
                                                   progress=progress):
        factors: Dict[str, torch.Tensor] = {}  # one U per input site
        for name in sorted(grams):
            site = owner[name]
            if site not in factors:
                factors[site] = inverse_factor(grams[name] * (2.0 / len(rows)), percdamp)
            dev = factors[site].device
            for b in budgets:
                w, info = safedelta_layer(aligned[name].to(dev), finetuned[name].to(dev), grams[name], b,
                                          budget_mode=budget_mode, blocksize=blocksize, exclude=exclude,
                                          factor=factors[site])
                states[b][name] = w.to(finetuned[name].dtype).cpu()
                stats[b][name] = info
    return Repaired(states, stats)


def safedelta_state(aligned_dir: str, finetuned_dir: str, rows: Iterable[Row], budget: float,
                    **options) -> Dict[str, torch.Tensor]:
    """``safedelta_states`` at one budget: every tensor of the repaired fine-tune."""
    return safedelta_states(aligned_dir, finetuned_dir, rows, [budget], **options).states[float(budget)]
