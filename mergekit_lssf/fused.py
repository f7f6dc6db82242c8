"""Which tensors LSSF fuses: the one decision, by the model's layout when known, else by name and shape.

LSSF fuses the linear projections of attention and MLP blocks: 2-D floating-point
``*.weight`` tensors, and the stacked MoE expert weights of transformers 5's layout
(``*.experts.gate_up_proj`` / ``*.experts.down_proj``, ``experts x d_out x d_in``;
mergekit 0.1.5 reads Mixtral-style checkpoints into it), one expert at a time. It
keeps the fine-tune's value for everything else, and ``kept_reason`` says why:

* ``vocabulary``: embeddings and ``lm_head`` (mergekit's ``vocabulary_axis``, or
  the names in ``VOCABULARY_NAME`` for callers without mergekit's metadata);
* ``router``: MoE routers and expert gates (``ROUTER_NAME``), whose rows index
  experts rather than features;
* ``not a weight``: 2-D parameters that are not a module's ``weight``, such as a
  state-space model's ``A_log``;
* ``1-D`` / ``3-D`` ... and ``not floating point``.

mergekit 0.1.5's architecture metadata (``WeightInfo``) marks vocabulary axes but
not which weights are linear projections. When the model's layout is known
(``layout.py``: the architecture built on the meta device from its config, each
parameter's module class), it decides: ``nn.Linear`` and ``Conv1D`` weights and
stacked experts are linear maps, everything else is kept (``not a linear map``, with
its module's class). Without it (no local config, an in-memory merge, a class
transformers cannot build) the name rules above decide. No torch or mergekit import.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # no torch import at run time
    from mergekit_lssf.layout import ParameterLayout

#: Vocabulary-indexed tensors by name.
VOCABULARY_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|lm_head|wte|wpe|word_embeddings|"
    r"position_embeddings|token_type_embeddings|shared)(\.|$)"
)
#: MoE routers: Mixtral/Phi-MoE ``block_sparse_moe.gate``, Qwen-MoE/DeepSeek/OLMoE
#: ``mlp.gate`` and ``shared_expert_gate``, Granite-MoE ``router.layer``, ``router``.
ROUTER_NAME = re.compile(r"(^|\.)(gate|router|shared_expert_gate|router\.layer)\.weight$")
#: Stacked expert weights, ``experts x d_out x d_in``.
STACKED_EXPERTS_NAME = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")


def is_vocabulary(name: str) -> bool:
    return bool(VOCABULARY_NAME.search(name or ""))


def kept_reason(name: Optional[str], shape: Optional[Sequence[int]], floating: Optional[bool] = True,
                vocabulary_axis: Optional[int] = None,
                layout: Optional["ParameterLayout"] = None) -> Optional[str]:
    """Why the tensor keeps the fine-tune's value, or None when LSSF fuses it.

    ``name``: the tensor's name (None or empty for unnamed in-memory tensors, which
    are judged by shape alone); ``shape``/``floating``: None when not known yet
    (a hub model before loading): the tensor is then judged by name alone.
    ``layout``: the parameter's ``layout.ParameterLayout`` when the model's class is
    known (it then decides what is a linear map: a ``Conv1D`` weight, stored
    ``d_in x d_out``, is fused in its transposed form); None: the name rules decide.
    """
    name = name or ""
    if vocabulary_axis is not None or is_vocabulary(name):
        return "vocabulary"
    if layout is not None:
        return _kept_by_layout(name, shape, floating, layout)
    stacked = bool(STACKED_EXPERTS_NAME.search(name))
    if shape is not None and len(shape) != (3 if stacked else 2):
        return "1-D" if len(shape) == 1 else f"{len(shape)}-D"
    if floating is False:
        return "not floating point"
    if stacked:
        return None
    if ROUTER_NAME.search(name):
        return "router"
    if name and not (name == "weight" or name.endswith(".weight")):
        return "not a weight"
    return None


def _kept_by_layout(name: str, shape: Optional[Sequence[int]], floating: Optional[bool],
                    layout: "ParameterLayout") -> Optional[str]:
    """``kept_reason`` when transformers told what the parameter is."""
    if ROUTER_NAME.search(name):  # an nn.Linear router (Qwen-MoE's shared_expert_gate) indexes experts
        return "router"
    if not layout.linear:
        if shape is not None and len(shape) == 1:
            return "1-D"
        return f"not a linear map ({layout.module})"
    if shape is not None and len(shape) != layout.ndim:
        return "1-D" if len(shape) == 1 else f"{len(shape)}-D"
    if floating is False:
        return "not floating point"
    return None


def fuses(name: Optional[str], shape: Optional[Sequence[int]], floating: Optional[bool] = True,
          vocabulary_axis: Optional[int] = None, layout: Optional["ParameterLayout"] = None) -> bool:
    """True for the tensors LSSF fuses (see ``kept_reason``)."""
    return kept_reason(name, shape, floating, vocabulary_axis, layout) is None
