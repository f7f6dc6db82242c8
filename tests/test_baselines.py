"""The peer baselines of issue 47 (``benchmarks/baselines``): Antidote and Safe Delta,
each against an independent float64 computation made here: inputs taken with this
test's own forward pre-hooks (each row alone through transformers' model, rendered
here), Wanda's per-row top-k in numpy, and Safe Delta as a slow column-by-column
Optimal Brain Surgeon with explicit inverses (no Cholesky)."""

import os
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safetensors.torch import load_file, save_file

from helpers import linear_inputs, load_state, word_rows
from mergekit_lssf.toy_models import ToySpec, build_toy_models

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from baselines.activations import fused_linear_names, write_model  # noqa: E402
from baselines.antidote import antidote_state, antidote_states, input_norms  # noqa: E402
from baselines.safedelta import block_budget, safedelta_layer, safedelta_states  # noqa: E402

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Tiny toy models; in the aligned one, one input feature of layer 0's q/k/v and one of
    its gate/up are never active (their norm weight is 0), as dead inputs can be."""
    root = tmp_path_factory.mktemp("baselines")
    build_toy_models(str(root), ToySpec(size="tiny", seed=7))
    path = root / "aligned" / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.input_layernorm.weight"][3] = 0.0
    state["model.layers.0.post_attention_layernorm.weight"][5] = 0.0
    save_file(state, path, metadata={"format": "pt"})
    return root


# ---- Antidote --------------------------------------------------------------------------------

def _numpy_prune(weight, norms, ratio):
    """True where Antidote prunes: per row, everything but the int(d_in * (1 - ratio))
    smallest of |W_ij| * ||X_j|| (numpy's stable argsort: ties keep the earlier column)."""
    scores = np.abs(weight) * norms[None, :]
    keep = int(weight.shape[1] * (1 - ratio))
    mask = np.ones(weight.shape, dtype=bool)
    order = np.argsort(scores, axis=1, kind="stable")
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask


def test_antidote_zeroes_the_top_wanda_scores_of_each_row(toy):
    rows = word_rows(1, 6)
    x = linear_inputs(str(toy / "finetuned"), rows)
    ft = load_state(toy / "finetuned")
    names = fused_linear_names(str(toy / "finetuned"))
    assert set(names) == set(x) and len(names) == 14  # every linear of both blocks, nothing else
    norms = input_norms(str(toy / "finetuned"), rows, batch_size=4, device="cpu")
    for name in names:
        np.testing.assert_allclose(norms[name].numpy(), np.linalg.norm(x[name], axis=0), rtol=1e-5)
    ratios = [0.0, 0.01, 0.05, 0.1]
    pruned = antidote_states(str(toy / "finetuned"), rows, ratios, batch_size=4, device="cpu")
    for ratio in ratios:
        state = pruned.states[ratio]
        assert set(state) == set(ft)
        for name, tensor in ft.items():
            if name not in names:
                assert torch.equal(state[name], tensor), name  # embeddings, norms, lm_head: untouched
                continue
            w = tensor.double().numpy()
            mask = _numpy_prune(w, np.linalg.norm(x[name], axis=0), ratio)
            per_row = w.shape[1] - int(w.shape[1] * (1 - ratio))
            assert (mask.sum(axis=1) == per_row).all() and ratio * w.shape[1] <= per_row < ratio * w.shape[1] + 1
            got = state[name]
            assert got.dtype == tensor.dtype
            np.testing.assert_array_equal(got.double().numpy(), np.where(mask, 0.0, w), err_msg=name)
            assert pruned.stats[ratio][name]["pruned"] == mask.sum()
    assert all(torch.equal(pruned.states[0.0][n], ft[n]) for n in names)  # ratio 0 prunes nothing


def test_antidote_on_the_update_prunes_only_what_the_fine_tune_changed(toy):
    """``aligned_dir``: the score is |W_ft - W_al| * ||X_j||, pruned entries go back to W_al."""
    rows = word_rows(2, 5)
    x = linear_inputs(str(toy / "finetuned"), rows)
    ft, al = load_state(toy / "finetuned"), load_state(toy / "aligned")
    state = antidote_state(str(toy / "finetuned"), rows, 0.05, aligned_dir=str(toy / "aligned"), device="cpu")
    for name in fused_linear_names(str(toy / "finetuned")):
        w_ft, w_al = ft[name].double().numpy(), al[name].double().numpy()
        mask = _numpy_prune(w_ft - w_al, np.linalg.norm(x[name], axis=0), 0.05)
        np.testing.assert_array_equal(state[name].double().numpy(), np.where(mask, w_al, w_ft), err_msg=name)


def test_write_model_copies_the_folder_with_the_new_weights(toy, tmp_path):
    rows = word_rows(3, 3)
    state = antidote_state(str(toy / "finetuned"), rows, 0.1, device="cpu")
    write_model(str(toy / "finetuned"), state, str(tmp_path / "antidote-0.1"))
    written = load_state(tmp_path / "antidote-0.1")
    assert set(written) == set(state) and all(torch.equal(written[n], state[n]) for n in state)
    assert AutoTokenizer.from_pretrained(tmp_path / "antidote-0.1").chat_template
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "antidote-0.1")
    assert torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight"])


# ---- Safe Delta: one layer against a slow float64 OBS ------------------------------------------

def _reference_safedelta(w_al, w_ft, h, budget, *, mode="relative", blocksize, exclude, percdamp=0.01):
    """Upstream's algorithm written the slow way: the inverse Hessian of the columns not
    yet fixed, inv(H[m:, m:]), recomputed for every column, and each row updated alone.
    Returns the weight and the set of (row, column) entries kept from the fine-tune."""
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    w = w_al.copy()
    rows, cols = w.shape
    keep = set()
    for i1 in range(0, cols, blocksize):
        block = range(i1, min(i1 + blocksize, cols))
        hinv = {m: np.linalg.inv(h[m:, m:])[0, 0] for m in block}
        entries = sorted((1.0 / hinv[m], r * len(block) + (m - i1), r, m) for r in range(rows) for m in block)
        candidates = entries[: len(entries) - int(exclude * len(entries))]
        losses = [(w_ft[r, m] - w[r, m]) ** 2 / hinv[m] for _, _, r, m in candidates]
        if mode == "relative":
            limit = np.inf if budget >= 1 else budget * sum(losses)
        else:
            limit = budget * rows / 4096 * len(block) / 4096 * np.mean([1.0 / hinv[m] for m in block])
        total = 0.0
        for (_, _, r, m), loss in zip(candidates, losses):
            total += loss
            if total > limit:
                break
            keep.add((r, m))
        for m in block:
            inverse = np.linalg.inv(h[m:, m:])
            for r in range(rows):
                q = w_ft[r, m] if (r, m) in keep else w[r, m]
                w[r, m:] -= (w[r, m] - q) / inverse[0, 0] * inverse[0, :]
                w[r, m] = q
    return w, keep


def _layer(seed, rows=6, cols=11, dead=(), same=()):
    """A random layer: correlated inputs (some never active), a dense fine-tune change
    (zero at the ``same`` entries)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, cols)) @ rng.standard_normal((cols, cols))
    x[:, list(dead)] = 0.0
    w_al = rng.standard_normal((rows, cols))
    w_ft = w_al + 0.1 * rng.standard_normal((rows, cols))
    for r, c in same:
        w_ft[r, c] = w_al[r, c]
    return w_al, w_ft, x.T @ x


@pytest.mark.parametrize("budget, mode, blocksize, exclude, lazy", [
    (0.05, "relative", 4, 0.15, 128), (0.3, "relative", 4, 0.15, 3), (0.7, "relative", 4, 0.0, 1),
    (1.0, "relative", 4, 0.15, 128), (0.3, "relative", 64, 0.15, 3), (0.2, "relative", 64, 0.0, 128),
    (3e4, "upstream", 4, 0.15, 3), (3e4, "upstream", 64, 0.15, 5),
])
def test_safedelta_layer_is_the_slow_obs(budget, mode, blocksize, exclude, lazy):
    """Three blocks (the last partial) or one, OBS sub-blocks of several widths; a dead
    input column; several budgets, relative and upstream's."""
    for seed in range(3):
        w_al, w_ft, h = _layer(seed, dead=(5,))
        want, keep = _reference_safedelta(w_al, w_ft, h, budget, mode=mode, blocksize=blocksize, exclude=exclude)
        got, info = safedelta_layer(torch.from_numpy(w_al), torch.from_numpy(w_ft), torch.from_numpy(h), budget,
                                    budget_mode=mode, blocksize=blocksize, exclude=exclude, lazy=lazy)
        assert 0 < len(keep) < w_al.size or budget == 1.0  # the budget cuts somewhere inside
        assert info["kept"] == len(keep)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10 * np.abs(want).max())
        # the realized loss ||E||^2 is tr((W' - W_al) H_damped (W' - W_al)^T)
        damped = h.copy()
        damped[5, 5] = 1.0
        damped += 0.01 * np.mean(np.diag(damped)) * np.eye(len(h))
        change = want - w_al
        assert info["loss"] == pytest.approx(np.trace(change @ damped @ change.T), rel=1e-9)


def test_safedelta_limits():
    """Budget 0: W_al exactly, even with entries the fine-tune left unchanged (zero cost,
    kept, no change). A budget that keeps every candidate: W_ft exactly on them, so W_ft
    itself with exclude 0; with upstream's exclude 0.15 the excluded entries are not W_ft."""
    for seed in range(3):
        w_al, w_ft, h = (torch.from_numpy(a) for a in _layer(seed, same=((0, 0), (2, 7), (4, 3))))
        for blocksize in (4, 64):
            got, info = safedelta_layer(w_al, w_ft, h, 0.0, blocksize=blocksize)
            assert torch.equal(got, w_al) and info["loss"] == 0.0 and info["kept"] <= 3
            got, info = safedelta_layer(w_al, w_ft, h, 1.0, blocksize=blocksize, exclude=0.0)
            assert torch.equal(got, w_ft) and info["kept"] == w_al.numel()
            assert safedelta_layer(w_al, w_ft, h, 1e12, budget_mode="upstream", blocksize=blocksize,
                                   exclude=0.0)[0].equal(w_ft)
            got, info = safedelta_layer(w_al, w_ft, h, 1.0, blocksize=blocksize, exclude=0.15)
            per_block = [6 * min(blocksize, 11 - i) for i in range(0, 11, blocksize)]
            assert info["kept"] == sum(n - int(0.15 * n) for n in per_block)
            same = got == w_ft
            assert int(same.sum()) >= info["kept"] and not same.all()


def test_the_upstream_budget_is_the_published_one_on_full_blocks():
    """upstream: loss_constraint = tmp.mean() * (s / 2) * (d_out / 4096) for a 2048-column
    block (Llama-2-7B: q/k/v/o, gate/up with 11008 rows, down_proj's full blocks)."""
    rng = np.random.default_rng(0)
    for rows in (4096, 11008):
        costs = torch.from_numpy(rng.random(2048) + 0.5).reshape(1, -1).expand(rows, 2048)
        published = float(costs.mean()) * (0.11 / 2) * (rows / 4096)
        assert block_budget(0.11, "upstream", torch.zeros(0), costs, rows, 2048) == pytest.approx(published, rel=1e-12)


def test_safedelta_budgeted_loss_grows_with_the_budget():
    """In one block the kept entries are a prefix of a fixed order: nested as the budget
    grows, and their summed loss (what the budget bounds) grows and stays within it. The
    realized loss ||E||^2 need not grow (a kept entry can compensate another): it is not
    asserted here."""
    budgets = np.linspace(0.0, 1.0, 21)
    for seed in range(4):
        w_al, w_ft, h = (torch.from_numpy(a) for a in _layer(seed, rows=5, cols=9))
        previous_kept, previous_loss, previous_set = -1, -1.0, set()
        for budget in budgets:
            got, info = safedelta_layer(w_al, w_ft, h, float(budget), blocksize=64)
            assert info["predicted_loss"] <= budget * info["candidate_loss"] * (1 + 1e-12) or budget == 1.0
            assert info["kept"] >= previous_kept and info["predicted_loss"] >= previous_loss
            _, keep = _reference_safedelta(w_al.numpy(), w_ft.numpy(), h.numpy(), budget, blocksize=64, exclude=0.15)
            assert keep >= previous_set
            previous_kept, previous_loss, previous_set = info["kept"], info["predicted_loss"], keep
        assert previous_loss == pytest.approx(info["candidate_loss"]) and previous_kept > 0


# ---- Safe Delta on models ------------------------------------------------------------------

def test_safedelta_states_repair_each_fused_weight_with_the_aligned_models_inputs(toy):
    """The model pass: H = (2 / n_rows) X^T X of each weight's input through the aligned
    model (this test's hooks), the layer algorithm on it, other tensors the fine-tune's."""
    rows = word_rows(4, 6)
    x = linear_inputs(str(toy / "aligned"), rows)
    ft, al = load_state(toy / "finetuned"), load_state(toy / "aligned")
    budgets = [0.0, 0.1, 1.0]
    repaired = safedelta_states(str(toy / "aligned"), str(toy / "finetuned"), rows, budgets, batch_size=4, device="cpu")
    names = fused_linear_names(str(toy / "finetuned"))
    for budget in budgets:
        state = repaired.states[budget]
        assert set(state) == set(ft)
        for name in set(ft) - set(names):
            assert torch.equal(state[name], ft[name]), name
        for name in names:
            h = torch.from_numpy(2.0 / len(rows) * x[name].T @ x[name])
            want, info = safedelta_layer(al[name], ft[name], h, budget)
            assert state[name].dtype == ft[name].dtype
            assert info["kept"] == repaired.stats[budget][name]["kept"], name
            np.testing.assert_allclose(state[name].double().numpy(), want.numpy(), rtol=0, atol=1e-5 * float(want.abs().max()))
    assert all(torch.equal(repaired.states[0.0][n], al[n]) for n in names)
    assert (x["model.layers.0.self_attn.q_proj.weight"][:, 3] == 0).all()  # the dead inputs were there


def test_safedelta_limits_on_bf16_models(tmp_path):
    """Stored bf16, as the testbed's models: budget 0 gives the aligned weights' bits,
    a budget that keeps all of delta (exclude 0) the fine-tune's."""
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=8, dtype="bfloat16"))
    ft, al = load_state(tmp_path / "finetuned"), load_state(tmp_path / "aligned")
    repaired = safedelta_states(str(tmp_path / "aligned"), str(tmp_path / "finetuned"), word_rows(5, 3), [0.0, 1.0],
                                exclude=0.0, device="cpu")
    for name in fused_linear_names(str(tmp_path / "finetuned")):
        assert repaired.states[0.0][name].dtype == torch.bfloat16
        assert torch.equal(repaired.states[0.0][name], al[name]) and torch.equal(repaired.states[1.0][name], ft[name])
