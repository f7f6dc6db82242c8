"""Reading safetensors headers and tensors with plain file reads (no torch import)."""

from __future__ import annotations

import json
import struct
from typing import Dict, Tuple


def read_header(path: str) -> Tuple[Dict, int]:
    """The header of a safetensors file (``__metadata__`` included) and the byte
    offset where its data section starts."""
    with open(path, "rb") as fp:
        (length,) = struct.unpack("<Q", fp.read(8))
        return json.loads(fp.read(length)), 8 + length
