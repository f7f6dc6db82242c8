"""The contrastive calibration file (``calibrate RECIPE --task``): format and lazy reader.

A safetensors file with, for every input site (the weights that read one input share
it: q/k/v, gate/up), keyed by the site's first weight name:

* ``{site}.V``  ``(d_in, k)`` float64, the leading generalized eigenvectors of
  ``(C_H, C_T + eps I)`` (``V^T B V = I``), ``k = min(max_rank, d_in)``;
* ``{site}.BV`` ``(d_in, k)`` float64, ``B V``;
* ``{site}.mu`` ``(d_in,)`` float64, **every** eigenvalue, descending (only ``d_in``
  floats, so the entropy rule over ``mu`` and the share the dropped vectors carry are
  known even when ``V`` is truncated); the first ``k`` belong to ``V``'s columns.

Stored in float64: ``V``'s entries grow like ``eps ** -0.5`` along directions that
neither set uses. String metadata: ``format``, ``sites`` (JSON: weight name -> site),
``finetuned_fingerprint`` / ``aligned_fingerprint`` (``subspace_file.model_fingerprint``),
``task`` (``"task"`` or ``"benign-only"``), ``task_sha256``, ``anchors_sha256``,
``eps``, ``normalization``, token counts, ``max_rank``, ``dropped_mu_share`` (the
largest share of ``sum(mu)`` that a site's dropped vectors carry; ``0.0`` when every
vector is stored) with ``dropped_mu_site`` (that site), and ``version``.

``FORMAT`` is ``/2``; a ``/1`` file (``mu`` of length ``k``, from before the whole
spectrum was stored) is still read: its vectors merge as before, and ``rank_rule:
entropy`` is refused on it when ``V`` was truncated (the spectrum is not all there).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Dict, Optional

import torch
from safetensors import safe_open

from mergekit_lssf.contrastive import ContrastiveBasis
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import OpenedFiles

FORMAT = "mergekit-lssf-contrastive/2"
#: The first layout: ``{site}.mu`` held only the ``k`` stored eigenvalues.
FORMAT_1 = "mergekit-lssf-contrastive/1"
NORMALIZATION = "trace"


#: Sites whose bases (and their per-lam factors) stay read: a few, so memory stays bounded.
RECENT_SITES = 2


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
        self.format = self.metadata.get("format")
        if isinstance(self.format, str) and self.format.startswith(FORMAT.rsplit("/", 1)[0] + "/") \
                and self.format not in (FORMAT, FORMAT_1):
            raise LSSFConfigError(f"contrastive calibration {path!r} has format {self.format!r}, which this mergekit-lssf "
                                  f"does not read (it reads {FORMAT!r} and {FORMAT_1!r}); upgrade mergekit-lssf")
        if self.format not in (FORMAT, FORMAT_1):
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
        self._recent: "OrderedDict[tuple, ContrastiveBasis]" = OrderedDict()

    def stored_rank(self) -> int:
        """The fewest vectors any site stores (a recipe's ``rank`` may not exceed it):
        the columns of ``V``, not the length of ``mu`` (the whole spectrum)."""
        with self._lock:
            return min((self._handle.get_slice(f"{site}.V").get_shape()[1] for site in set(self.sites.values())),
                       default=0)

    def site(self, weight_name: str) -> str:
        """The input site ``weight_name`` reads (the site's first weight name)."""
        return self.sites.get(weight_name, weight_name)

    def has(self, weight_name: str) -> bool:
        return weight_name in self.sites

    def basis(self, weight_name: str, d_in: int, device: Optional[torch.device] = None) -> ContrastiveBasis:
        """The generalized eigenbasis of the input site that ``weight_name`` reads."""
        if not self.has(weight_name):
            raise LSSFConfigError(f"contrastive calibration {self.path}: no site for weight {weight_name} "
                                  "(was it calibrated on another model or architecture?)")
        site = self.sites[weight_name]
        key = (site, d_in, str(device))
        with self._lock:
            if key in self._recent:  # the weights of one site (q/k/v, gate/up) come one after another
                self._recent.move_to_end(key)
                return self._recent[key]
        basis = self._read(weight_name, site, d_in, device)
        with self._lock:
            self._recent[key] = basis
            while len(self._recent) > RECENT_SITES:
                self._recent.popitem(last=False)
        return basis

    def _read(self, weight_name: str, site: str, d_in: int, device: Optional[torch.device]) -> ContrastiveBasis:
        with self._lock:
            try:
                v, bv, mu = (self._handle.get_tensor(f"{site}.{part}") for part in ("V", "BV", "mu"))
            except Exception as error:  # a tensor missing from the file
                raise LSSFConfigError(f"contrastive calibration {self.path}: site {site} is incomplete "
                                      f"({error}); calibrate again") from None
        mu_length = v.shape[1] if self.format == FORMAT_1 else v.shape[0]  # /2: the whole spectrum
        if v.ndim != 2 or v.shape != bv.shape or mu.shape != (mu_length,):
            raise LSSFConfigError(f"contrastive calibration {self.path}: site {site} has V {list(v.shape)}, BV "
                                  f"{list(bv.shape)} and mu {list(mu.shape)}, which do not fit together")
        if v.shape[0] != d_in:
            raise LSSFConfigError(f"contrastive calibration {self.path}: V of weight {weight_name} has {v.shape[0]} "
                                  f"rows, but the weight reads {d_in} inputs")
        k = v.shape[1]
        spectrum = mu if self.format == FORMAT or k == d_in else None  # a truncated /1 file lacks the tail
        return ContrastiveBasis(v.to(device), bv.to(device), mu[:k].to(device), self.eps,
                                None if spectrum is None else spectrum.to(device))


#: The process-wide ContrastiveFile for a path (``safetensors_io.OpenedFiles``).
open_contrastive = OpenedFiles(ContrastiveFile)
