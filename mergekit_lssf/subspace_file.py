"""The calibrated-subspace file: format, model fingerprint, writer and lazy reader.

A safetensors file with, for every linear weight the merge fuses,
``{weight_name}.U`` (``d_out x k``, float32, orthonormal columns) and
``{weight_name}.S`` (every nonzero singular value of ``Z = W_safe X_hat``, float64,
descending), and string metadata: ``format``, ``fingerprint`` (of the aligned
model) and ``fingerprint_scheme``, ``architecture``, ``anchors_sha256``, ``tokens``, ``normalization``,
``max_rank``, ``version``.

``calibrate`` writes it with ``safetensors_io.StreamedWriter``, one decoder block at
a time, so memory does not grow with depth.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import List, Optional

import torch
from safetensors import safe_open

from mergekit_lssf.kernel import SafetySubspace
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.safetensors_io import OpenedFiles, read_header, required_weight_files

FORMAT = "mergekit-lssf-subspace/1"
NORMALIZATION = "unit-l2-per-token"
#: The fingerprint hashes this many evenly spaced blocks of every tensor's bytes.
FINGERPRINT_SCHEME = "tensor-samples/1"
_SAMPLE_BLOCKS = 8
_BLOCK_BYTES = 4096


def model_fingerprint(model_dir: str) -> str:
    """SHA-256 over the architecture, every tensor's name, dtype and shape, and
    ``_SAMPLE_BLOCKS`` evenly spaced ``_BLOCK_BYTES`` blocks of every tensor's data
    (all of it when smaller): a few hundred KiB read for a 70B model, and a safety tune
    that changes one projection weight changes the fingerprint (scheme
    ``FINGERPRINT_SCHEME``)."""
    digest = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fp:
        digest.update(json.dumps(json.load(fp).get("architectures"), sort_keys=True).encode())
    for path in required_weight_files(model_dir):
        header, start = read_header(path)
        tensors = sorted((k, v) for k, v in header.items() if k != "__metadata__")
        digest.update(json.dumps([(k, v["dtype"], v["shape"]) for k, v in tensors]).encode())
        with open(path, "rb") as fp:
            for _name, info in tensors:
                begin, end = info["data_offsets"]
                for offset in _sample_offsets(end - begin):
                    fp.seek(start + begin + offset)
                    digest.update(fp.read(min(_BLOCK_BYTES, end - begin - offset)))
    return digest.hexdigest()


def adapter_sha256(adapter_dir: str) -> str:
    """SHA-256 over a PEFT adapter folder's config and weight files (names and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(adapter_dir)):
        if name == "adapter_config.json" or name.startswith("adapter_model."):
            digest.update(name.encode())
            with open(os.path.join(adapter_dir, name), "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _sample_offsets(size: int) -> List[int]:
    """Offsets of the blocks hashed in a tensor of ``size`` bytes: every block when the
    tensor holds at most ``_SAMPLE_BLOCKS`` of them, else that many evenly spaced."""
    if size <= _SAMPLE_BLOCKS * _BLOCK_BYTES:
        return list(range(0, size, _BLOCK_BYTES))
    step = (size - _BLOCK_BYTES) / (_SAMPLE_BLOCKS - 1)
    return [int(i * step) for i in range(_SAMPLE_BLOCKS)]


class SubspaceFile:
    """A subspace file opened once; U and S are read lazily, per weight."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise LSSFConfigError(f"lssf parameter `subspace`: no such file {path!r}")
        self.path = path
        try:
            self._handle = safe_open(path, framework="pt")
        except Exception as error:
            raise LSSFConfigError(f"lssf parameter `subspace`: {path!r} is not a safetensors file ({error})") from None
        self.metadata = self._handle.metadata() or {}
        if self.metadata.get("format") != FORMAT:
            raise LSSFConfigError(
                f"lssf parameter `subspace`: {path!r} is not an lssf subspace file "
                f"(format {self.metadata.get('format')!r}, expected {FORMAT!r}); "
                "make one with `mergekit-lssf calibrate`"
            )
        self._keys = set(self._handle.keys())
        self._lock = threading.Lock()

    def has(self, weight_name: str) -> bool:
        return f"{weight_name}.U" in self._keys and f"{weight_name}.S" in self._keys

    def subspace(self, weight_name: str, shape, device: Optional[torch.device] = None) -> SafetySubspace:
        """The calibrated subspace of one weight of shape ``(d_out, d_in)``."""
        if not self.has(weight_name):
            raise LSSFConfigError(
                f"lssf: weight {weight_name} is missing from subspace file {self.path} "
                "(was it calibrated on another architecture or with other layers?)"
            )
        with self._lock:
            basis = self._handle.get_tensor(f"{weight_name}.U")
            sigma = self._handle.get_tensor(f"{weight_name}.S")
        if basis.shape[0] != shape[0]:
            raise LSSFConfigError(
                f"lssf: subspace file {self.path} has U of shape {list(basis.shape)} for "
                f"weight {weight_name}, whose output dimension is {shape[0]} (shape {list(shape)})"
            )
        # S are the singular values of Z = W_safe X_hat, a d_out x tokens matrix: the
        # noise-floor rule's aspect ratio is that of Z (decision; the weight's shape
        # when the file does not record the token count)
        tokens = int(self.metadata.get("tokens") or 0)
        z_shape = (shape[0], tokens) if tokens > 0 else tuple(shape)
        return SafetySubspace(sigma.to(device, torch.float64), basis.to(device), "output", z_shape)

    def check_fingerprint(self, model_dir: str, label: str) -> None:
        if self.metadata.get("fingerprint_scheme") != FINGERPRINT_SCHEME:
            raise LSSFConfigError(
                f"lssf parameter `subspace`: {self.path} was made by an older mergekit-lssf, whose "
                "fingerprint read only the start of each weight file and cannot tell the aligned model "
                "from another model of the same architecture; calibrate again with `mergekit-lssf calibrate`"
            )
        expected = self.metadata.get("fingerprint")
        actual = model_fingerprint(model_dir)
        if expected != actual:
            source = self.metadata.get("model") or "a model whose path the file does not record"
            raise LSSFConfigError(
                f"lssf parameter `subspace`: {self.path} was calibrated on {source} "
                f"(architecture {self.metadata.get('architecture', '?')}, fingerprint {str(expected)[:12]}), "
                f"not on the recipe's {label} model {model_dir} (fingerprint {actual[:12]}); "
                "calibrate on the aligned model of this recipe"
            )


#: The process-wide SubspaceFile for a path (``safetensors_io.OpenedFiles``).
open_subspace = OpenedFiles(SubspaceFile)
