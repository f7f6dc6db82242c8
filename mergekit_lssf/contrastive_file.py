"""The contrastive calibration file (``calibrate RECIPE --task``): format and lazy reader.

A safetensors file with, for every input site (the weights that read one input share
it: q/k/v, gate/up), keyed by the site's first weight name:

* ``{site}.V``  ``(d_in, k)`` float64, the leading generalized eigenvectors of
  ``(C_H, C_T + eps I)`` (``V^T B V = I``);
* ``{site}.BV`` ``(d_in, k)`` float64, ``B V``;
* ``{site}.mu`` ``(k,)`` float64, the eigenvalues, descending.

Stored in float64: ``V``'s entries grow like ``eps ** -0.5`` along directions that
neither set uses. String metadata: ``format``, ``sites`` (JSON: weight name -> site),
``finetuned_fingerprint`` / ``aligned_fingerprint`` (``subspace_file.model_fingerprint``),
``task`` (``"task"`` or ``"benign-only"``), ``task_sha256``, ``anchors_sha256``,
``eps``, ``normalization``, token counts, ``max_rank`` and ``version``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Dict, Optional

import torch
from safetensors import safe_open

from mergekit_lssf.contrastive import ContrastiveBasis
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import OpenedFiles

FORMAT = "mergekit-lssf-contrastive/1"
NORMALIZATION = "trace"


class ContrastiveFile:
    """A contrastive calibration file opened once; each site is read lazily."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise LSSFConfigError(f"contrastive calibration: no such file {path!r}")
        self.path = path
        try:
            self._handle = safe_open(path, framework="pt")
        except Exception as error:
            raise LSSFConfigError(f"contrastive calibration: {path!r} is not a safetensors file ({error})") from None
        self.metadata = self._handle.metadata() or {}
        if self.metadata.get("format") != FORMAT:
            raise LSSFConfigError(
                f"{path!r} is not a contrastive calibration file (format {self.metadata.get('format')!r}, expected "
                f"{FORMAT!r}); make one with `mergekit-lssf calibrate RECIPE --task TASK.jsonl`")
        try:
            self.sites: Dict[str, str] = json.loads(self.metadata.get("sites", "{}"))
        except ValueError:
            raise LSSFConfigError(f"contrastive calibration {path!r}: its `sites` metadata is not JSON; "
                                  "calibrate again") from None
        self.eps = float(self.metadata.get("eps", "nan"))
        self._lock = threading.Lock()

    def stored_rank(self) -> int:
        """The fewest vectors any site stores (a recipe's ``rank`` may not exceed it)."""
        with self._lock:
            return min((self._handle.get_slice(f"{site}.mu").get_shape()[0] for site in set(self.sites.values())),
                       default=0)

    def has(self, weight_name: str) -> bool:
        return weight_name in self.sites

    def basis(self, weight_name: str, d_in: int, device: Optional[torch.device] = None) -> ContrastiveBasis:
        """The generalized eigenbasis of the input site that ``weight_name`` reads."""
        if not self.has(weight_name):
            raise LSSFConfigError(f"contrastive calibration {self.path}: no site for weight {weight_name} "
                                  "(was it calibrated on another model or architecture?)")
        site = self.sites[weight_name]
        with self._lock:
            try:
                v, bv, mu = (self._handle.get_tensor(f"{site}.{part}") for part in ("V", "BV", "mu"))
            except Exception as error:  # a tensor missing from the file
                raise LSSFConfigError(f"contrastive calibration {self.path}: site {site} is incomplete "
                                      f"({error}); calibrate again") from None
        if v.shape != bv.shape or mu.shape != (v.shape[1],):
            raise LSSFConfigError(f"contrastive calibration {self.path}: site {site} has V {list(v.shape)}, BV "
                                  f"{list(bv.shape)} and mu {list(mu.shape)}, which do not fit together")
        if v.shape[0] != d_in:
            raise LSSFConfigError(f"contrastive calibration {self.path}: V of weight {weight_name} has {v.shape[0]} "
                                  f"rows, but the weight reads {d_in} inputs")
        return ContrastiveBasis(v.to(device), bv.to(device), mu.to(device), self.eps)


#: The process-wide ContrastiveFile for a path (``safetensors_io.OpenedFiles``).
open_contrastive = OpenedFiles(ContrastiveFile)
