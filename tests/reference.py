"""Independent float64 reference of LSSF: numpy full SVD, entropy by a plain loop.

Shares no code with mergekit_lssf: a test that compares against this catches a
wrong formula, not just a changed one.
"""

import math

import numpy as np


def reference_rank(s, eta, max_rank=None, rank=None):
    """Eq. 5-7 with python floats; returns (r, H_r / H_n)."""
    s2 = [float(x) ** 2 for x in s]
    total = sum(s2)
    if total == 0:
        return 0, 0.0
    p = [x / total for x in s2]
    h = [(-q * math.log(q)) if q > 0 else 0.0 for q in p]
    cumulative, acc = [], 0.0
    for value in h:
        acc += value
        cumulative.append(acc)
    h_n = cumulative[-1]
    nonzero = sum(q > 0 for q in p)
    if rank is not None:
        r = min(rank, nonzero)
    elif h_n == 0:
        r = 1
    else:
        r = next(i + 1 for i, c in enumerate(cumulative) if c >= eta * h_n)
        if max_rank is not None:
            r = min(r, max_rank)
    return r, (cumulative[r - 1] / h_n if h_n > 0 else 1.0)


def reference_alphas(s_r, weight_max):
    """Eq. 10: a_i = 1 + (w - 1)(s_i - s_r)/(s_1 - s_r), written out per element."""
    r = len(s_r)
    if weight_max == 1 or r == 1 or s_r[0] - s_r[-1] <= 1e-6 * s_r[0]:  # tied up to round-off
        return np.ones(r)
    return np.array(
        [1 + (weight_max - 1) * (s_r[i] - s_r[-1]) / (s_r[0] - s_r[-1]) for i in range(r)]
    )


def reference_lssf(ft, aligned, unaligned, *, alpha, eta, max_rank=None, weight_max=1.0, rank=None):
    """The paper's Eq. 13, W_ft + alpha * U' U'^T delta with U' = U_r diag(a) from numpy's
    float64 SVD: ``reference_fuse`` with the entropy rule and ``fusion="add"``."""
    return reference_fuse(ft, aligned, unaligned, alpha=alpha, eta=eta, max_rank=max_rank,
                          weight_max=weight_max, rank=rank, rank_rule="entropy", fusion="add")


def make_delta(rows, cols, singular_values, seed=0):
    """rows x cols float64 matrix with the given singular values (zero-padded)."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    s = np.zeros(k)
    s[: len(singular_values)] = singular_values[:k]
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * s) @ v.T


def spectra(k, seed=0):
    """Realistic spectra of length k, by name."""
    rng = np.random.default_rng(seed)
    planted = np.concatenate([np.logspace(0, -1, min(8, k)), 0.02 * rng.random(max(k - 8, 0))])
    return {
        "planted_plus_noise": np.sort(planted)[::-1],
        "heavy_tailed": 1.0 / np.arange(1, k + 1) ** 0.7,
        "rank_deficient": np.concatenate([np.linspace(1.0, 0.3, min(5, k)), np.zeros(max(k - 5, 0))]),
    }


def reference_calibrated(model_dir, anchors, weight_names):
    """U and S of Z = W X_hat by a whole-model forward per anchor and numpy's SVD.

    Independent of mergekit_lssf.calibrate: no block streaming, no batching or
    padding, no Gram matrices. anchors: list of (prompt, response).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = {n + ".weight": m for n, m in model.named_modules() if n + ".weight" in weight_names}
    inputs = {n: [] for n in modules}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0][0].double().numpy())) for n, m in modules.items()]
    for prompt, response in anchors:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            model(torch.tensor([list(ids)]))
    for h in hooks:
        h.remove()
    out = {}
    for name, module in modules.items():
        x = np.concatenate(inputs[name])
        x_hat = x / np.linalg.norm(x, axis=1, keepdims=True)
        z = module.weight.detach().double().numpy() @ x_hat.T
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        out[name] = (u, s)
    return out


def reference_noise_floor(s, shape, max_rank=None):
    """Gavish-Donoho hard threshold, written out: returns (rank, tau).

    ``s``: numpy singular values of a ``shape`` matrix; values at round-off level
    (``s_i^2 <= n eps s_1^2``) count as zero, as the method spec says.
    """
    rows, cols = shape
    n = min(rows, cols)
    s = np.zeros(n) + np.pad(np.asarray(s, dtype=np.float64), (0, max(0, n - len(s))))[:n]
    if s.max() == 0:
        return 0, 0.0
    s = np.where(s**2 > n * np.finfo(np.float64).eps * s.max() ** 2, s, 0.0)
    beta = n / max(rows, cols)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = omega * float(np.median(s))
    r = int(sum(1 for x in s if x > tau))
    if max_rank is not None:
        r = min(r, max_rank)
    return r, tau


def reference_fuse(ft, aligned, unaligned, *, alpha, eta=0.9, max_rank=None, weight_max=1.0,
                   rank=None, rank_rule="entropy", fusion="add"):
    """Both rank rules and both fusions from numpy's float64 SVD of delta:
    add: W_ft + alpha U' U'^T delta; restore: W_ft + alpha U' U'^T (W_aligned - W_ft)."""
    ft, aligned, unaligned = (np.asarray(x, dtype=np.float64) for x in (ft, aligned, unaligned))
    delta = aligned - unaligned
    u, s, _vt = np.linalg.svd(delta, full_matrices=False)
    if rank is not None or rank_rule == "entropy":
        r, _share = reference_rank(s, eta, max_rank, rank)
    else:
        r, _tau = reference_noise_floor(s, delta.shape, max_rank)
    if r == 0:
        return ft.copy(), 0
    u_prime = u[:, :r] * reference_alphas(s[:r], weight_max)[None, :]
    target = delta if fusion == "add" else aligned - ft
    return ft + alpha * (u_prime @ u_prime.T) @ target, r
