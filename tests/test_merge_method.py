"""The lssf method through mergekit's in-memory API (merge_state_dicts)."""

import numpy as np
import pytest
import torch
from mergekit.merge_methods import get, merge_state_dicts

from mergekit_lssf import LSSFConfigError
from mergekit_lssf.registration import register
from reference import reference_lssf

ROLES = {"al": "aligned", "un": "unaligned"}


def _state_dicts(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (50, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.up_proj.weight": (40, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 40),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.bias": (16,),
        "lm_head.weight": (50, 16),
    }
    sds = {k: {} for k in ("ft", "al", "un")}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        sds["un"][name] = base.to(dtype)
        sds["al"][name] = (base + 0.3 * torch.randn(shape, generator=g)).to(dtype)
        sds["ft"][name] = (base + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    for sd in sds.values():
        sd["model.rotary.inv_freq_step"] = torch.arange(4)
    return sds


def _merge(sds, **parameters):
    params = {"role": ROLES, **parameters}
    return merge_state_dicts(sds, "lssf", base="ft", parameters=params)


def test_registered_and_idempotent():
    assert get("lssf") is register() is register()


def test_in_memory_merge_matches_reference():
    sds = _state_dicts()
    out = _merge(sds, alpha=0.8, eta=0.9, weight_max=1.5, max_rank=None, fusion="add")
    for name, tensor in out.items():
        ft = sds["ft"][name]
        if name.endswith("proj.weight"):
            ref, _ = reference_lssf(ft.numpy(), sds["al"][name].numpy(), sds["un"][name].numpy(), alpha=0.8, eta=0.9, weight_max=1.5)
            assert np.linalg.norm(tensor.numpy() - ref) / np.linalg.norm(ref) < 1e-5, name
        else:  # embeddings, lm_head, norms, biases, integer buffers: the fine-tune's, bit for bit
            assert torch.equal(tensor, ft), name


def test_bfloat16_state_dicts_keep_dtype():
    sds = _state_dicts(dtype=torch.bfloat16)
    out = _merge(sds)
    assert all(t.dtype == sds["ft"][n].dtype for n, t in out.items())


@pytest.mark.parametrize(
    "roles, message",
    [
        ({"al": "aligned", "un": "aligned"}, "exactly one model with `role: aligned`"),
        ({"al": "safe", "un": "unaligned"}, "must be one of aligned, unaligned, got 'safe'"),
    ],
)
def test_role_errors(roles, message):
    with pytest.raises(Exception, match=message):
        merge_state_dicts(_state_dicts(), "lssf", base="ft", parameters={"role": roles})


def test_missing_role_and_base():
    with pytest.raises(TypeError, match="Missing required parameter role"):
        merge_state_dicts(_state_dicts(), "lssf", base="ft")
    with pytest.raises(LSSFConfigError, match="base_model"):
        merge_state_dicts(_state_dicts(), "lssf", parameters={"role": ROLES})


@pytest.mark.parametrize(
    "parameter, value, message",
    [
        ("eta", 1.5, "`eta` must satisfy 0 < eta <= 1"),
        ("eta", 0.0, "`eta` must satisfy 0 < eta <= 1"),
        ("weight_max", 0.5, "`weight_max` must satisfy 1 <= weight_max <= 10"),
        ("max_rank", 0, "`max_rank` must be an integer >= 1"),
        ("rank", -2, "`rank` must be an integer >= 1"),
        ("alpha", float("nan"), "`alpha` must satisfy 0 < alpha <= 2, got nan"),
        ("subspace", "basis.safetensors", "`subspace`: no such file 'basis.safetensors'"),
        ("subspace", "", "`subspace` must be the path of a file"),
    ],
)
def test_parameter_errors_name_the_field(parameter, value, message):
    with pytest.raises(Exception, match=message):
        _merge(_state_dicts(), **{parameter: value})


@pytest.mark.parametrize("who", ["ft", "al", "un"])
def test_non_finite_input_is_refused(who):
    sds = _state_dicts()
    sds[who]["model.layers.0.mlp.up_proj.weight"][3, 2] = float("nan")
    label = {"ft": "fine-tuned", "al": "aligned", "un": "unaligned"}[who]
    with pytest.raises(LSSFConfigError, match=rf"model.layers.0.mlp.up_proj.weight of the {label} model \({who}\) has 1 non-finite"):
        _merge(sds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_count_non_finite_matches_isfinite(dtype):
    from mergekit_lssf.merge_method import count_non_finite

    rng = np.random.default_rng(0)
    for shape in [(1,), (7, 3), (300, 257)]:
        x = torch.randn(shape).to(dtype)
        assert count_non_finite(x) == 0
        flat = x.view(-1)
        for value in (float("nan"), float("inf"), float("-inf")):
            y = flat.clone()
            where = rng.choice(y.numel(), size=min(3, y.numel()), replace=False)
            y[torch.tensor(where)] = value
            assert count_non_finite(y.view(shape)) == len(where)
    # huge but finite values must not be flagged (no overflowing sum is involved)
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert count_non_finite(big) == 0
    assert count_non_finite(torch.empty(0, dtype=dtype)) == 0
    assert count_non_finite(torch.arange(5)) == 0


def test_solver_failure_names_the_tensor(monkeypatch):
    import mergekit_lssf.leading_eigh as leading_eigh

    def failing(info, routine):
        raise RuntimeError(f"LAPACK {routine} failed with info=7")

    monkeypatch.setattr(leading_eigh, "_check", failing)
    sds = _state_dicts()
    sds = {k: {n: t.repeat(3, 3) if t.ndim == 2 else t.repeat(3) for n, t in sd.items()} for k, sd in sds.items()}
    with pytest.raises(RuntimeError, match=r"lssf: computing tensor model\.layers\.0\..* failed: LAPACK dsytrd failed"):
        _merge(sds)


def test_shape_mismatch_is_refused():
    sds = _state_dicts()
    sds["un"]["model.layers.0.mlp.up_proj.weight"] = torch.randn(41, 16)
    with pytest.raises(ValueError, match="size mismatch for model.layers.0.mlp.up_proj.weight"):
        _merge(sds)


def test_zero_delta_layer_is_unchanged():
    sds = _state_dicts()
    sds["al"] = {k: v.clone() for k, v in sds["un"].items()}
    out = _merge(sds)
    assert all(torch.equal(out[n], sds["ft"][n]) for n in out)
