"""``mergekit-lssf calibrate``: the paper's activation-based safety subspace (Eq. 4).

The aligned model reads an anchor set of harmful prompts with refusals, each rendered
with its chat template as one user turn and one assistant turn. For every linear layer
we collect its input at every token, scale each token's vector to unit L2 norm
(``x_hat``) and accumulate ``C = sum x_hat x_hat^T`` (layers sharing an input share
``C``; a layer whose input is wider than its output accumulates ``Z Z^T`` instead).
``U`` and the singular values of ``Z = W_safe X_hat`` follow from the kernel.

Memory-bounded: decoder blocks are processed one at a time (load the block's
weights, run all anchors' cached hidden states through it, accumulate, compute U and
S, free the block), so peak memory is about one block, the anchors' hidden states
and one block's statistics, whatever the depth. Supports decoder-only models with the
Llama layout (``model.embed_tokens``, ``model.layers``, ``model.rotary_emb``): Llama,
Mistral, Qwen2, SmolLM2 and the like.
"""

from __future__ import annotations

import hashlib
import os
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mergekit_lssf.generation import generate, load_model
from mergekit_lssf.kernel import calibrated_subspace, gram_root
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import StoredTensor, StreamedWriter, folder_index, read_tensor
from mergekit_lssf.subspace_file import FINGERPRINT_SCHEME, FORMAT, NORMALIZATION, model_fingerprint
from mergekit_lssf.version import __version__


@dataclass
class Anchor:
    prompt: str
    response: Optional[str] = None


def default_anchors() -> List[Anchor]:
    """The 128 HarmBench prompts of the shipped `anchor` split (no responses)."""
    text = resources.files("mergekit_lssf").joinpath("data/harmbench/prompts.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Anchor(r["prompt"]) for r in rows if r["split"] == "anchor"]


def jsonl_objects(path: str, refusal: str) -> Iterator[Tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line of the JSONL file ``path``; a
    line that is not a JSON object stops with ``{path}:{line}: {refusal}``."""
    with open(path, encoding="utf-8") as fp:
        for number, line in enumerate(fp, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise LSSFConfigError(f"{path}:{number}: {refusal}")
            yield number, row


def load_anchors(path: Optional[str]) -> List[Anchor]:
    if path is None:
        return default_anchors()
    anchors = []
    expected = "expected a JSON object with a \"prompt\" string"
    for number, row in jsonl_objects(path, expected):
        if "prompt" not in row:
            raise LSSFConfigError(f"{path}:{number}: {expected}")
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise LSSFConfigError(f"{path}:{number}: \"prompt\" must be a non-empty string")
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise LSSFConfigError(f"{path}:{number}: \"response\" must be a string")
        anchors.append(Anchor(prompt, response))
    if not anchors:
        raise LSSFConfigError(f"{path}: no anchors")
    return anchors


def anchors_sha256(anchors: List[Anchor]) -> str:
    blob = "\n".join(json.dumps([a.prompt, a.response]) for a in anchors)
    return hashlib.sha256(blob.encode()).hexdigest()


def fill_responses(model_dir: str, anchors: List[Anchor], *, device: torch.device,
                   batch_size: int, max_new_tokens: int, progress: bool,
                   tokenizer_dir: Optional[str] = None) -> List[Anchor]:
    """Answer anchors without a response greedily with the model itself (its refusals).

    This step loads the whole model; pass responses in --anchors for models that do
    not fit in memory.
    """
    missing = [a for a in anchors if a.response is None]
    if not missing:
        return anchors
    model, tokenizer = load_model(model_dir, str(device), tokenizer_dir)
    answers = generate(model, tokenizer, [a.prompt for a in missing], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, desc="generating anchor responses")
    for anchor, answer in zip(missing, answers):
        anchor.response = answer
    del model
    return anchors


def render(tokenizer, anchors: List[Anchor]) -> List[List[int]]:
    """Token ids of each anchor: chat template, one user turn and one assistant turn."""
    ids = []
    for a in anchors:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": a.prompt}, {"role": "assistant", "content": a.response}], tokenize=True
        )
        ids.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return ids


def _load_into(index: Dict[str, StoredTensor], module: torch.nn.Module, prefix: str, device: torch.device) -> None:
    """Fill ``module`` (on the meta device) with the float32 tensors named ``prefix*``."""
    state = {n[len(prefix):]: read_tensor(t).to(device, torch.float32) for n, t in index.items() if n.startswith(prefix)}
    module.load_state_dict(state, strict=True, assign=True)


class _Statistics:
    """Forward pre-hooks that accumulate Gram matrices of unit-norm token inputs.

    ``discover(run)`` runs one forward to find which linear layers read the same
    input tensor (q/k/v, gate/up): they share one ``C``. A layer with its own input
    that is wider than its output (down_proj) accumulates ``Z Z^T`` instead.
    """

    def __init__(self, block: torch.nn.Module, prefix: str, raw: bool = False):
        self.raw = raw  # True: plain input Grams X^T X, every site on its input side (contrastive)
        self.linears = {f"{prefix}{n}.weight": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        self.valid: Optional[torch.Tensor] = None  # (batch, seq) bool: real tokens
        self.owner: Dict[str, str] = {}  # weight name -> weight name whose hook owns its input
        self.output_side: Dict[str, bool] = {}
        self.grams: Dict[str, torch.Tensor] = {}
        self._weights64: Dict[str, torch.Tensor] = {}  # output-side weights in float64, made once
        self._discovering = False
        self._seen: Dict[int, str] = {}
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]

    def discover(self, run) -> None:
        # Inputs are kept alive during this pass: a freed tensor's address can be
        # reused within one forward, and then two different inputs would look shared.
        self._discovering, self._seen, self._alive = True, {}, []
        run()
        self._discovering, self._alive = False, []
        for name, module in self.linears.items():
            shared = sum(1 for o in self.owner.values() if o == self.owner[name]) > 1
            self.output_side[name] = not self.raw and not shared and module.weight.shape[1] > module.weight.shape[0]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._discovering:
                self._alive.append(x)
                self.owner[name] = self._seen.setdefault(x.data_ptr(), name)
                return
            if self.owner[name] != name:
                return  # shares the input (and C) of its owner
            rows = x.reshape(-1, x.shape[-1])[self.valid.reshape(-1)].to(torch.float64)
            if not self.raw:
                rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30)
            if self.output_side[name]:
                if name not in self._weights64:
                    self._weights64[name] = module.weight.detach().to(torch.float64)
                rows = rows @ self._weights64[name].T  # rows of Z^T
            gram = rows.T @ rows
            if name in self.grams:
                self.grams[name] += gram
            else:
                self.grams[name] = gram
        return hook

    def begin(self, valid: torch.Tensor) -> None:
        self.valid = valid

    def subspaces(self, max_rank: int) -> Dict[str, torch.Tensor]:
        out, roots = {}, {}  # roots: one gram_root per shared input (q/k/v, gate/up)
        for name, module in self.linears.items():
            weight = module.weight.detach()
            owner = self.owner[name]
            if self.output_side[name]:
                u, s = calibrated_subspace(weight, output_gram=self.grams[owner], max_rank=max_rank)
            else:
                if owner not in roots:
                    roots[owner] = gram_root(self.grams[owner])
                u, s = calibrated_subspace(weight, input_root=roots[owner], max_rank=max_rank)
            out[f"{name}.U"], out[f"{name}.S"] = u.cpu(), s.cpu()
        return out

    def close(self):
        for h in self._hooks:
            h.remove()
        self._weights64.clear()


def open_streamed(model_dir: str, dev: torch.device):
    """``(config, body, rotary, weights)`` of a Llama-layout decoder built on the meta
    device: its blocks are filled one at a time by ``blocks`` (no full model in memory)."""
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"  # causal without a mask: right padding is exact
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = model.model
    rotary = type(body.rotary_emb)(config=config).to(dev)
    return config, body, rotary, folder_index(model_dir)


def embed_batches(weights: Dict[str, StoredTensor], config, token_ids: List[List[int]], batch_size: int,
                  dev: torch.device) -> List[tuple]:
    """The rows' embeddings in right-padded batches: ``(hidden (b, t, d), valid (b, t),
    position ids (1, t))`` each, float32 on ``dev``."""
    batches = []
    embed = torch.nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
    _load_into(weights, embed, "model.embed_tokens.", dev)
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start:start + batch_size]
        length = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        valid = torch.zeros(len(chunk), length, dtype=torch.bool)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            valid[row, : len(seq)] = True
        with torch.no_grad():
            hidden = embed(ids.to(dev))
        batches.append((hidden, valid.to(dev), torch.arange(length, device=dev)[None]))
    return batches


def blocks(config, body, rotary, weights: Dict[str, StoredTensor], dev: torch.device, progress: bool):
    """Yield ``(index, prefix, block, forward)`` for every decoder block, its weights
    loaded (float32) for the time of the step and freed after; ``forward(hidden,
    positions)`` runs the block."""
    for index in tqdm(range(config.num_hidden_layers), desc="calibrating blocks", disable=not progress):
        prefix = f"model.layers.{index}."
        block = body.layers[index]
        _load_into(weights, block, prefix, dev)

        def forward(hidden, positions, block=block):
            out = block(hidden, attention_mask=None, position_ids=positions,
                        position_embeddings=rotary(hidden, positions))
            return out[0] if isinstance(out, tuple) else out

        yield index, prefix, block, forward
        block.to("meta")


def run_through(forward, batches: List[tuple], stats: "_Statistics") -> None:
    """Every batch through one block, its statistics collected; each batch's hidden
    states are replaced by the block's output (the next block's input)."""
    for b, (hidden, valid, positions) in enumerate(batches):
        stats.begin(valid)
        batches[b] = (forward(hidden, positions), valid, positions)


def calibrate(model_dir: str, out_path: str, *, anchors_path: Optional[str] = None, max_rank: int = 256,
              device: str = "auto", batch_size: int = 8, max_new_tokens: int = 64, progress: bool = True) -> Dict:
    """Compute and write the calibrated subspace of ``model_dir``; returns the metadata."""
    if max_rank < 1 or batch_size < 1:
        raise LSSFConfigError("--max-rank and --batch-size must be >= 1")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    started = time.perf_counter()
    anchors = fill_responses(model_dir, load_anchors(anchors_path), device=dev, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress)
    token_ids = render(AutoTokenizer.from_pretrained(model_dir), anchors)

    config, body, rotary, weights = open_streamed(model_dir, dev)
    batches = embed_batches(weights, config, token_ids, batch_size, dev)
    tokens = int(sum(len(ids) for ids in token_ids))

    writer = StreamedWriter(out_path)
    try:
        for index, prefix, block, forward in blocks(config, body, rotary, weights, dev, progress):
            stats = _Statistics(block, prefix)
            with torch.no_grad():
                stats.discover(lambda: forward(batches[0][0], batches[0][2]))
                run_through(forward, batches, stats)
            stats.close()
            writer.add(stats.subspaces(max_rank))
            del stats
        metadata = {
            "format": FORMAT,
            "fingerprint": model_fingerprint(model_dir),
            "fingerprint_scheme": FINGERPRINT_SCHEME,
            "model": os.path.abspath(model_dir),
            "architecture": ",".join(config.architectures or []),
            "anchors_sha256": anchors_sha256(anchors),
            "anchors": len(anchors),
            "tokens": tokens,
            "normalization": NORMALIZATION,
            "max_rank": max_rank,
            "version": __version__,
        }
        writer.finish(metadata)
    except BaseException:
        writer.close()
        raise
    return {**metadata, "seconds": round(time.perf_counter() - started, 2)}
