"""mergekit-lssf: LSSF (Low-Rank Safety Subspace Fusion) as a mergekit merge method.

``import mergekit_lssf`` registers ``merge_method: lssf`` with mergekit (idempotent);
installed with pip, the package also registers it in every process that imports
mergekit, so a plain ``mergekit-yaml`` knows it.

Modules: ``kernel`` (the math, pure torch), ``merge_method`` (mergekit glue),
``recipe`` (pre-flight recipe check), ``cli`` (the ``mergekit-lssf`` command).
"""

from mergekit_lssf.version import __version__  # noqa: F401

import mergekit_lssf_startup

# The finder first, then mergekit's merge_methods: when they load now, the hook
# imports mergekit_lssf.registration whole and registers lssf.
mergekit_lssf_startup.install()
import mergekit.merge_methods  # noqa: E402,F401

from mergekit_lssf.registration import install_loaded  # noqa: E402

install_loaded()

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
