"""The names an lssf setting may take, defined once (no dependencies).

The kernel types its arguments with these ``Literal`` types; the recipe validators
(``parameters.py``) and the kernel's own checks read the tuples derived from them.
"""

from __future__ import annotations

from typing import get_args

from typing_extensions import Literal

Side = Literal["output", "input"]
RankRule = Literal["entropy", "noise_floor"]
Fusion = Literal["add", "restore", "contrastive"]
Spectrum = Literal["full", "signal"]
Rounding = Literal["subspace", "nearest"]
#: the 16-bit dtypes lssf can round its output to (``round_to``)
RoundTo = Literal["bfloat16", "float16"]

RANK_RULES = get_args(RankRule)
FUSIONS = get_args(Fusion)
SPECTRA = get_args(Spectrum)
ROUNDINGS = get_args(Rounding)
ROUND_TO = get_args(RoundTo)
