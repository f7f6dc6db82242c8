"""The one reader and streaming writer of safetensors files: headers, a model
folder's tensor index, tensors read with plain file reads, and one file written in
parts.

No memory map: mapped pages that were touched stay in the process's resident set,
so reading every layer of a model through one would make memory grow with depth.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Generic, List, Optional, Tuple, TypeVar

import torch
from safetensors.torch import save_file

from mergekit_lssf.parameters import LSSFConfigError

#: safetensors dtype names -> torch dtypes (the ones model files hold).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def read_header(path: str) -> Tuple[Dict, int]:
    """The header of a safetensors file (``__metadata__`` included) and the byte
    offset where its data section starts."""
    with open(path, "rb") as fp:
        (length,) = struct.unpack("<Q", fp.read(8))
        return json.loads(fp.read(length)), 8 + length


def weight_files(folder: str) -> List[str]:
    """The ``*.safetensors`` files of a model folder, sorted; [] when it has none."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]


def required_weight_files(folder: str) -> List[str]:
    files = weight_files(folder)
    if not files:
        raise LSSFConfigError(f"no .safetensors weights in {folder}")
    return files


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies: its file, the byte range of its data, dtype and shape."""

    file: str
    begin: int  # absolute byte offsets in ``file``
    end: int
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: Tuple[int, ...]

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def folder_index(folder: str) -> Dict[str, StoredTensor]:
    """name -> StoredTensor for every tensor of the folder's safetensors files, from
    their headers alone ({} when there are none)."""
    index: Dict[str, StoredTensor] = {}
    for path in weight_files(folder):
        header, start = read_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                index[name] = StoredTensor(path, start + begin, start + end, info["dtype"], tuple(info["shape"]))
    return index


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """The tensor's values, read with one plain read (a fresh, writable CPU tensor)."""
    dtype = DTYPES[stored.dtype]
    with open(stored.file, "rb") as fp:
        fp.seek(stored.begin)
        data = bytearray(fp.read(stored.end - stored.begin))
    flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return flat.reshape(stored.shape)


class StreamedWriter:
    """One safetensors file written in parts: each ``add`` saves its tensors to a part
    file beside ``path`` (nothing stays in memory), ``finish`` streams the parts into
    ``path`` behind one header and renames it into place (atomic), ``close`` drops the
    parts. Nothing is created before the first ``add``."""

    def __init__(self, path: str):
        self.path = path
        self._tmp: Optional[str] = None
        self._parts: List[str] = []

    def add(self, tensors: Dict[str, torch.Tensor]) -> None:
        if self._tmp is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self._tmp = tempfile.mkdtemp(prefix=".lssf-parts-", dir=directory)
        part = os.path.join(self._tmp, f"part-{len(self._parts):05d}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, part)
        self._parts.append(part)

    def finish(self, metadata: Dict[str, str]) -> None:
        entries, offset, sources = {}, 0, []
        for part in self._parts:
            header, start = read_header(part)
            header.pop("__metadata__", None)
            base = offset
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                entries[name] = {**info, "data_offsets": [base + begin, base + end]}
                offset = max(offset, base + end)
            sources.append((part, start))
        entries["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(entries, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        partial = self.path + ".partial"
        with open(partial, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for part, start in sources:
                with open(part, "rb") as src:
                    src.seek(start)
                    shutil.copyfileobj(src, out, 1 << 24)
        os.replace(partial, self.path)
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


Opened = TypeVar("Opened")


class OpenedFiles(Generic[Opened]):
    """``open_file(path)`` once per process, and again when the file was replaced or
    rewritten since (keyed on real path, inode, mtime and size); thread-safe."""

    def __init__(self, open_file: Callable[[str], Opened]):
        self._open_file = open_file
        self._opened: Dict[tuple, Opened] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str) -> Opened:
        real = os.path.realpath(path)
        try:
            stat = os.stat(real)
            key = (real, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (real,)  # no such file: open_file names it
        with self._lock:
            if key not in self._opened:
                self._opened[key] = self._open_file(path)
            return self._opened[key]
