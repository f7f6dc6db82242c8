"""Which parameters are linear maps, and how they are stored: asked of transformers.

LSSF fuses linear maps only, and projects on the *output* side of ``W`` (``d_out x
d_in``). Most models store a linear weight as ``torch.nn.Linear`` does, ``out x in``;
GPT-2-family models (GPT-2, DistilGPT-2, ...) use ``transformers.pytorch_utils.Conv1D``,
which stores ``in x out``. A tensor name cannot tell them apart, so this module builds
the architecture on the meta device from the model's ``config.json`` (no weights, no
download: ``CONFIG_MAPPING[model_type].from_dict`` and the class named in
``architectures``) and reads each parameter's module class:

* ``LINEAR``: the ``weight`` of an ``nn.Linear`` (or a subclass): ``d_out x d_in``;
* ``CONV1D``: the ``weight`` of a ``transformers`` ``Conv1D``: ``d_in x d_out``;
* ``EXPERTS``: a 3-D parameter of a stacked MoE experts module (transformers 5:
  ``*.experts.gate_up_proj`` / ``*.experts.down_proj``), ``experts x d_out x d_in``;
* ``EXPERTS_TRANSPOSED``: the same with ``is_transposed`` set (GPT-OSS-style),
  ``experts x d_in x d_out``;
* ``OTHER``: everything else (embeddings, norms, biases, ``nn.Conv1d`` kernels,
  state-space parameters such as ``A_log`` and ``D``, routers that are not
  ``nn.Linear``): not a linear map LSSF fuses.

Names: a parameter is looked up by the name mergekit gives it (its architecture
file's output name) or the checkpoint's, which may differ from the model's by a
prefix (GPT-2 checkpoints saved from ``GPT2Model`` store ``h.0.attn.c_attn.weight``,
the model names it ``transformer.h.0.attn.c_attn.weight``; vision-language models add
``language_model.``): the longest dotted suffix of the name that the model's names
share decides, when all the parameters it matches agree on the kind.

The config is read from the model's local folder (for ``model+lora``, the model under
the adapter), or from the local Hugging Face cache for a hub id; nothing is downloaded.
When the class cannot be built (an unknown ``model_type``, remote code, a hub id not in
the cache, an in-memory merge whose inputs have no config) the callers fall back
to the name rules of ``fused.py``, and say so once (one log line per cause).

Results are cached by the config's content (its canonical JSON), never by path or by
what ran before. No mergekit import.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch

LOG = logging.getLogger("mergekit_lssf")

LINEAR = "linear"
CONV1D = "conv1d"
EXPERTS = "experts"
EXPERTS_TRANSPOSED = "experts_transposed"
OTHER = "other"
LINEAR_KINDS = (LINEAR, CONV1D, EXPERTS, EXPERTS_TRANSPOSED)


@dataclass(frozen=True)
class ParameterLayout:
    """One parameter's kind (``LINEAR``, ``CONV1D``, ``EXPERTS``, ``EXPERTS_TRANSPOSED``
    or ``OTHER``) and the class name of the module that owns it (``"Conv1D"``)."""

    kind: str
    module: str

    @property
    def linear(self) -> bool:
        """True for a linear map (2-D weight, or 3-D stacked experts)."""
        return self.kind in LINEAR_KINDS

    @property
    def transposed(self) -> bool:
        """True when each 2-D weight is stored ``d_in x d_out`` (``Conv1D``, transposed
        experts): LSSF fuses its transpose."""
        return self.kind in (CONV1D, EXPERTS_TRANSPOSED)

    @property
    def ndim(self) -> Optional[int]:
        """The tensor's expected number of dimensions (None for ``OTHER``)."""
        return {LINEAR: 2, CONV1D: 2, EXPERTS: 3, EXPERTS_TRANSPOSED: 3}.get(self.kind)


class ModelLayout:
    """Every parameter of one architecture, by name, with suffix lookup (``get``)."""

    def __init__(self, parameters: Mapping[str, ParameterLayout], architecture: str = ""):
        self.parameters: Dict[str, ParameterLayout] = dict(parameters)
        self.architecture = architecture
        # every dotted suffix of every name (two components at least) -> the kinds it meets
        suffixes: Dict[str, set] = {}
        for name, layout in self.parameters.items():
            parts = name.split(".")
            for i in range(1, len(parts) - 1):
                suffixes.setdefault(".".join(parts[i:]), set()).add(layout)
        self._suffixes = suffixes

    def get(self, name: Optional[str]) -> Optional[ParameterLayout]:
        """The layout of the parameter called ``name`` (mergekit's or the checkpoint's
        name), or None when no parameter of the model matches it unambiguously."""
        if not name:
            return None
        found = self.parameters.get(name)
        if found is not None:
            return found
        parts = name.split(".")
        for i in range(len(parts) - 1):  # the name itself, then shorter suffixes
            suffix = ".".join(parts[i:])
            exact = self.parameters.get(suffix)
            if exact is not None:
                return exact
            matches = self._suffixes.get(suffix)
            if matches:
                return next(iter(matches)) if len(matches) == 1 else None
        return None

    def kinds(self) -> Dict[str, str]:
        """``{name: kind}`` of every parameter."""
        return {name: layout.kind for name, layout in self.parameters.items()}


def _module_layout(module: torch.nn.Module, leaf: str, tensor: torch.Tensor) -> ParameterLayout:
    from transformers.pytorch_utils import Conv1D

    cls = type(module).__name__
    if leaf == "weight" and isinstance(module, Conv1D):
        return ParameterLayout(CONV1D, cls)
    if leaf == "weight" and isinstance(module, torch.nn.Linear):
        return ParameterLayout(LINEAR, cls)
    if tensor.ndim == 3 and _is_experts(module, leaf):
        return ParameterLayout(EXPERTS_TRANSPOSED if getattr(module, "is_transposed", False) else EXPERTS, cls)
    return ParameterLayout(OTHER, cls)


def _is_experts(module: torch.nn.Module, leaf: str) -> bool:
    """A stacked-experts module (transformers 5: ``MixtralExperts``, ``Qwen3MoeExperts``,
    ..., decorated with ``use_experts_implementation``, which sets ``is_transposed``)."""
    name = type(module).__name__
    return (hasattr(module, "is_transposed") or name.endswith("Experts")) and leaf in (
        "gate_up_proj", "down_proj", "up_proj", "gate_proj")


def layout_of_model(model: torch.nn.Module) -> Dict[str, ParameterLayout]:
    """``{parameter name: ParameterLayout}`` of a built model (tied names included)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        out[name] = _module_layout(modules.get(owner, model), leaf, tensor)
    return out


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def layout_from_config(config: Mapping[str, Any]) -> Optional[ModelLayout]:
    """The layout of the architecture ``config`` (a ``config.json`` as a dict)
    describes, built on the meta device; None when transformers cannot build it (said
    once per config in the log: the callers then decide by name). Cached by the
    config's content."""
    layout, _error = _layout_from_json(_canonical(config))
    return layout


@functools.lru_cache(maxsize=64)
def _layout_from_json(text: str) -> Tuple[Optional[ModelLayout], Optional[str]]:
    config = json.loads(text)
    try:
        model = _build_on_meta(config)
    except Exception as error:  # noqa: BLE001 - any failure means: decide by name
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        LOG.warning("lssf: cannot build the %s architecture from its config on the meta device (%s); "
                    "deciding which tensors are linear by their names (a GPT-2-style Conv1D weight, stored "
                    "in x out, would then be fused as if it were out x in)",
                    config.get("model_type", "unknown"), reason[:200])
        return None, reason
    return ModelLayout(layout_of_model(model), type(model).__name__), None


def _build_on_meta(config: Dict[str, Any]) -> torch.nn.Module:
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not one transformers {transformers.__version__} knows")
    cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # config sanity notes of a meta build are not the user's concern
    try:
        with torch.device("meta"):
            for arch in config.get("architectures") or []:
                cls = getattr(transformers, arch, None)
                if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                    return cls._from_config(cfg)
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                try:
                    return auto.from_config(cfg)
                except ValueError:
                    continue
        raise ValueError(f"no model class for {config.get('architectures') or model_type}")
    finally:
        quiet.setLevel(level)


def read_config(folder: str) -> Optional[Dict[str, Any]]:
    """The ``config.json`` of a local model folder, or None (no folder, no file, not JSON)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as fp:
            config = json.load(fp)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def layout_of_folder(folder: str) -> Optional[ModelLayout]:
    """The layout of the model in a local folder (None: not local, or not buildable)."""
    config = read_config(folder)
    return layout_from_config(config) if config is not None else None


def reference_folder(reference: Any) -> Optional[str]:
    """The local folder of the model a mergekit ``ModelReference`` names: for
    ``model+lora`` the model under the adapter (a LoRA merge keeps every shape and
    module); None for anything else (an in-memory merge's arbitrary id) or a hub id."""
    model = getattr(reference, "model", None)
    path = getattr(model, "path", None)
    if not isinstance(path, str) or not os.path.isdir(path):
        return None
    return path


def _hub_cache_folder(reference: Any) -> Optional[str]:
    """The folder of a hub model's ``config.json`` in the local Hugging Face cache (where
    mergekit put it), without any download; None when it is not there."""
    model = getattr(reference, "model", None)
    repo = getattr(model, "path", None)
    if not isinstance(repo, str) or os.path.isabs(repo) or repo.startswith("."):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=getattr(model, "revision", None))
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: unknown
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


_SAID = set()


def _say_once(key: str, message: str, *args) -> None:
    if key not in _SAID:
        _SAID.add(key)
        LOG.warning(message, *args)


def layout_of_reference(reference: Any) -> Optional[ModelLayout]:
    """The layout of the model behind a mergekit ``ModelReference``; None (said once
    per cause) when it is not a local folder with a ``config.json``."""
    folder = reference_folder(reference) or _hub_cache_folder(reference)
    if folder is None:
        if getattr(reference, "model", None) is None:
            _say_once("in-memory", "lssf: the inputs have no model config (an in-memory merge): deciding which "
                      "tensors are linear by their names (a GPT-2-style Conv1D weight, stored in x out, would "
                      "be fused as if it were out x in)")
        else:
            _say_once(f"remote:{reference}", "lssf: %s is neither a local model folder nor in the Hugging Face "
                      "cache: deciding which tensors are linear by their names", reference)
        return None
    config = read_config(folder)
    if config is None:
        _say_once(f"noconfig:{folder}", "lssf: %s has no readable config.json: deciding which tensors are "
                  "linear by their names", folder)
        return None
    return layout_from_config(config)


def parameter_layout(reference: Any, name: Optional[str]) -> Optional[ParameterLayout]:
    """The layout of tensor ``name`` of the model ``reference`` names (None: unknown)."""
    layout = layout_of_reference(reference)
    if layout is None:
        return None
    found = layout.get(name)
    if found is None and name:
        _say_once(f"unmatched:{layout.architecture}", "lssf: %s (and maybe more) is not a parameter of %s as "
                  "transformers builds it: such tensors are judged by their names", name, layout.architecture)
    return found


def group_layout(group: Any) -> Optional[ParameterLayout]:
    """The layout of the tensor a mergekit ``TensorGroup`` merges, from its base entry's
    model (the fine-tune's config) and ``group.metadata.name``; None when unknown."""
    base = getattr(group, "base", None)
    if base is None:
        return None
    return parameter_layout(base.id, getattr(group.metadata, "name", None))


def as_out_in(layout: Optional[ParameterLayout], weight: torch.Tensor) -> torch.Tensor:
    """A 2-D weight (or one expert's) as ``d_out x d_in``: transposed when its layout
    stores ``d_in x d_out`` (a view, no copy), unchanged otherwise."""
    if weight is None:
        return None
    return weight.transpose(-2, -1) if layout is not None and layout.transposed else weight


def from_out_in(layout: Optional[ParameterLayout], weight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``as_out_in``: back to the stored layout, contiguous."""
    return weight.transpose(-2, -1).contiguous() if layout is not None and layout.transposed else weight


def fuse_oriented(layout: Optional[ParameterLayout], fuse: Callable[..., torch.Tensor],
                  *weights: torch.Tensor) -> torch.Tensor:
    """``fuse`` (over 2-D ``d_out x d_in`` weights) applied to ``weights`` as stored:
    transposed in, fused, transposed out for ``Conv1D``-style (``d_in x d_out``) weights."""
    return from_out_in(layout, fuse(*(as_out_in(layout, w) for w in weights)))


def describe(names: Iterable[str], layout: Optional[ModelLayout]) -> Dict[str, Optional[str]]:
    """``{name: kind or None}`` for ``names`` (a debugging and test helper)."""
    return {n: (layout.get(n).kind if layout is not None and layout.get(n) is not None else None) for n in names}


__all__ = [
    "CONV1D", "EXPERTS", "EXPERTS_TRANSPOSED", "LINEAR", "OTHER", "ModelLayout", "ParameterLayout",
    "as_out_in", "fuse_oriented", "from_out_in", "group_layout", "layout_from_config", "layout_of_folder",
    "layout_of_model", "layout_of_reference", "parameter_layout", "read_config", "reference_folder",
]
