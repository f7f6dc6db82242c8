"""mergekit-lssf: LSSF (Low-Rank Safety Subspace Fusion) as a mergekit merge method.

``import mergekit_lssf`` registers ``merge_method: lssf`` with mergekit (idempotent);
installed with pip, the package also registers it in every process that imports
mergekit, so a plain ``mergekit-yaml`` knows it.

Modules: ``kernel`` (the math, pure torch), ``merge_method`` (mergekit glue),
``recipe`` (pre-flight recipe check), ``cli`` (the ``mergekit-lssf`` command).
"""

__version__ = "0.1.0"

from mergekit_lssf.registration import install as _install

_install()

from mergekit_lssf.kernel import (  # noqa: E402
    FusionInfo,
    RankChoice,
    SafetySubspace,
    data_free_subspace,
    lssf_fuse,
    projection_weights,
    select_rank,
    spectral_entropy,
)
from mergekit_lssf.merge_method import LSSF_METHOD  # noqa: E402
from mergekit_lssf.parameters import LSSFConfigError  # noqa: E402

__all__ = [
    "FusionInfo",
    "LSSF_METHOD",
    "LSSFConfigError",
    "RankChoice",
    "SafetySubspace",
    "data_free_subspace",
    "lssf_fuse",
    "projection_weights",
    "select_rank",
    "spectral_entropy",
]
