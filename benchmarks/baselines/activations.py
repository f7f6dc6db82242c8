"""What the peer baselines share: which weights they touch, the inputs those weights see,
and model folders in and out.

* Which weights: the fused linear weights of the package (``mergekit_lssf.fused.fuses``
  with the parameter's layout as transformers builds it, ``layout.layout_of_folder``).
  Only ``nn.Linear`` weights (``d_out x d_in``) are supported here: a ``Conv1D`` or a
  stacked-experts weight is refused in one line.
* Their inputs: the rows (``{prompt, response}``) rendered as the package renders a
  training row (``contrastive_calibrate.render_pairs``: the chat template's text of one
  user and one assistant turn, tokenised without added special tokens), run through
  the model one decoder block at a time with the package's streamed forward
  (``calibrate.open_streamed`` / ``embed_batches`` / ``blocks`` / ``run_through``,
  right-padded batches, padding excluded) and its forward pre-hooks
  (``calibrate._Statistics`` with ``raw=True``): the raw float64 input Gram
  ``G = sum_t x_t x_t^T`` over every real token of every row, one per input site
  (q/k/v share one, gate/up another); or, where only its diagonal is needed, the
  sums of squares ``sum_t x_tj^2`` from pre-hooks of this module (``_SquareSums``).
  Llama-layout decoders only, as ``calibrate``.
* Folders: every tensor read as stored (``safetensors_io``), written back with the
  testbed's writer (``lssf_testbed.repairs._write_like``: a copy of the model folder
  with its weights replaced).
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from transformers import AutoTokenizer

from mergekit_lssf.calibrate import Anchor, _Statistics, blocks, embed_batches, open_streamed, run_through
from mergekit_lssf.contrastive_calibrate import render_pairs
from mergekit_lssf.fused import fuses
from mergekit_lssf.layout import LINEAR, layout_of_folder
from mergekit_lssf.safetensors_io import folder_index, read_tensor

Row = Union[Anchor, Tuple[str, str], dict]


def as_rows(rows: Iterable[Row]) -> List[Anchor]:
    """``Anchor(prompt, response)`` of each row: an ``Anchor``, a ``(prompt, response)``
    pair, or a dict with ``prompt`` and ``response`` (or ``answer``)."""
    out = []
    for row in rows:
        if isinstance(row, Anchor):
            prompt, response = row.prompt, row.response
        elif isinstance(row, dict):
            prompt, response = row.get("prompt"), row.get("response", row.get("answer"))
        else:
            prompt, response = row
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"a row needs a prompt and a response string, got {row!r}")
        out.append(Anchor(prompt, response))
    if not out:
        raise ValueError("no rows")
    return out


def fused_linear_names(model_dir: str) -> List[str]:
    """The weights of ``model_dir`` the package fuses (``fused.fuses`` with the layout
    transformers reports for each parameter), sorted; every one must be an
    ``nn.Linear`` weight (``d_out x d_in``)."""
    layout = layout_of_folder(model_dir)
    if layout is None:
        raise ValueError(f"{model_dir}: transformers cannot build this model from its config.json")
    names = []
    for name, stored in folder_index(model_dir).items():
        parameter = layout.get(name)
        if parameter is None or not fuses(name, stored.shape, stored.floating, layout=parameter):
            continue
        if parameter.kind != LINEAR:
            raise ValueError(f"{name}: a {parameter.kind} weight ({parameter.module}); the baselines handle "
                             "nn.Linear weights only")
        names.append(name)
    return sorted(names)


def read_state(model_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the model folder, as stored (dtype included)."""
    return {name: read_tensor(stored) for name, stored in folder_index(model_dir).items()}


def write_model(model_dir: str, state: Dict[str, torch.Tensor], out_dir: str) -> None:
    """A copy of the model folder ``model_dir`` (config, tokenizer, ...) whose weights
    are ``state``, written to ``out_dir`` (atomically: a ``.partial`` folder renamed)."""
    from lssf_testbed.repairs import _write_like  # the testbed's writer; benchmarks/ is on sys.path

    _write_like(model_dir, state, out_dir)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _streamed_blocks(model_dir: str, rows: Iterable[Row], *, batch_size: int, device: str, progress: bool,
                     tokenizer_dir: Optional[str]):
    """``(prefix, block, forward, batches, wanted)`` for each decoder block of
    ``model_dir`` in order (the package's streamed forward: ``batches`` hold the rows'
    hidden states at the block's input, ``run_through`` moves them on), with
    ``wanted`` the model's fused linear weights; raises at the end when one of them
    was not in any block."""
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    ids = render_pairs(tokenizer, as_rows(rows))
    wanted = set(fused_linear_names(model_dir))
    config, body, rotary, weights = open_streamed(model_dir, dev)
    batches = embed_batches(weights, config, ids, batch_size, dev)
    seen = set()
    for _index, prefix, block, forward in blocks(config, body, rotary, weights, dev, progress):
        seen.update(f"{prefix}{n}.weight" for n, _ in block.named_modules())
        yield prefix, block, forward, batches, wanted
    missing = sorted(wanted - seen)
    if missing:
        raise ValueError(f"{model_dir}: {len(missing)} fused linear weights are outside the decoder blocks' "
                         f"forward (first: {missing[0]})")


def block_input_grams(model_dir: str, rows: Iterable[Row], *, batch_size: int = 8, device: str = "auto",
                      progress: bool = False, tokenizer_dir: Optional[str] = None
                      ) -> Iterator[Tuple[str, Dict[str, torch.Tensor], Dict[str, str]]]:
    """For each decoder block of ``model_dir``, in order: ``(prefix, grams, owner)``,
    ``grams[weight]`` the raw float64 input Gram of each fused linear weight of the
    block over every real token of ``rows`` (on ``device``; weights that share an input
    share the tensor: ``calibrate._Statistics``) and ``owner[weight]`` the weight whose
    hook took it."""
    for prefix, block, forward, batches, wanted in _streamed_blocks(
            model_dir, rows, batch_size=batch_size, device=device, progress=progress, tokenizer_dir=tokenizer_dir):
        stats = _Statistics(block, prefix, raw=True)
        with torch.no_grad():
            first = batches[0]
            stats.discover(lambda: forward(first[0], first[2]))
            stats.grams = {}
            run_through(forward, batches, stats)
        stats.close()
        _check_reached(block, prefix, wanted, stats.owner)
        names = sorted(wanted & set(stats.owner))
        yield prefix, {n: stats.grams[stats.owner[n]] for n in names}, {n: stats.owner[n] for n in names}


def _check_reached(block: torch.nn.Module, prefix: str, wanted: set, reached) -> None:
    """Every fused linear weight of the block had its input taken."""
    missed = sorted(n for n in (f"{prefix}{m}.weight" for m, _ in block.named_modules()) if n in wanted and n not in reached)
    if missed:
        raise ValueError(f"{missed[0]}: no input reached this fused linear weight in the block's forward")


class _SquareSums:
    """Forward pre-hooks on the block's fused linears: ``sums[weight][j] = sum_t x_tj^2``
    over the real tokens (``begin(valid)``), in float64. Cheaper than a Gram when only
    its diagonal is needed."""

    def __init__(self, block: torch.nn.Module, prefix: str, wanted: set):
        self.valid: Optional[torch.Tensor] = None
        self.sums: Dict[str, torch.Tensor] = {}
        self._hooks = [m.register_forward_pre_hook(self._hook(f"{prefix}{n}.weight"))
                       for n, m in block.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{prefix}{n}.weight" in wanted]

    def begin(self, valid: torch.Tensor) -> None:
        self.valid = valid

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[self.valid.reshape(-1)].to(torch.float64)
            squares = (x * x).sum(0)
            self.sums[name] = self.sums[name] + squares if name in self.sums else squares
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def input_square_sums(model_dir: str, rows: Iterable[Row], *, batch_size: int = 8, device: str = "auto",
                      progress: bool = False, tokenizer_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """``sum_t x_tj^2`` (float64, CPU) of the input of every fused linear weight of
    ``model_dir`` over every real token of ``rows``: the diagonal of the input Gram."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, block, forward, batches, wanted in _streamed_blocks(
            model_dir, rows, batch_size=batch_size, device=device, progress=progress, tokenizer_dir=tokenizer_dir):
        sums = _SquareSums(block, prefix, wanted)
        with torch.no_grad():
            run_through(forward, batches, sums)
        sums.close()
        _check_reached(block, prefix, wanted, sums.sums)
        out.update({n: v.cpu() for n, v in sums.sums.items()})
    return out
