"""Per-run record of what the lssf kernel did, for logs and the final summary."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

#: A fused weight keeping less of its term than this after the cast is named in a warning.
KEPT_WARNING = 0.8
#: "Far lower": a capped rank counts as set by rounding noise when the signal rank is
#: below this share of it.
SIGNAL_SHARE_WARNING = 0.5


@dataclass(frozen=True)
class TensorRecord:
    """One fused tensor: its name, rank, entropy share kept and spectral seconds
    (wall time of the thread that computed them). ``rounding_edge`` / ``signal_rank``:
    the 16-bit rounding edge of delta and the count of singular values above it
    (None for inputs not stored in 16 bits); ``kept``: the share of the term the
    written weight keeps (1.0 for a float32 output)."""

    name: str
    rank: int
    capped: bool
    entropy_share: float
    spectral_seconds: float
    rounding_edge: Optional[float] = None
    signal_rank: Optional[int] = None
    kept: float = 1.0


class MergeStats:
    """Thread-safe collector; mergekit may execute tensors from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: List[TensorRecord] = []
        self.passed_through = 0
        #: the dtype the merge writes (mergekit's ``out_dtype``); None: the inputs'
        self.output_dtype: Optional[torch.dtype] = None

    def reset(self, output_dtype: Optional[torch.dtype] = None) -> None:
        with self._lock:
            self._records = []
            self.passed_through = 0
            self.output_dtype = output_dtype

    def add(self, record: TensorRecord) -> None:
        with self._lock:
            self._records.append(record)

    def add_passthrough(self) -> None:
        with self._lock:
            self.passed_through += 1

    @property
    def records(self) -> List[TensorRecord]:
        with self._lock:
            return list(self._records)

    def summary(self) -> str:
        """Tensors fused, min/mean/max rank, seconds of spectral work; with 16-bit inputs
        or outputs also the signal ranks and the share of the term kept (``warnings``
        are apart: they print even with --quiet)."""
        records = self.records
        if not records:
            return f"lssf: fused 0 tensors ({self.passed_through} kept from the fine-tune)"
        ranks = [r.rank for r in records]
        capped = sum(r.capped for r in records)
        seconds = sum(r.spectral_seconds for r in records)
        zero = sum(r == 0 for r in ranks)
        lines = [
            f"lssf: fused {len(records)} tensors ({self.passed_through} kept from the "
            f"fine-tune); rank min {min(ranks)} / mean {sum(ranks) / len(ranks):.1f} / "
            f"max {max(ranks)}; {capped} capped by max_rank; "
            + (f"{zero} at rank 0 (left as the fine-tune's); " if zero else "")
            + f"{seconds:.2f} s in spectral work"
        ]
        for words in (self.precision_words(), self.kept_words()):
            if words:
                lines.append(words)
        return "\n".join(lines)

    def precision_words(self) -> Optional[str]:
        """The rounding edge's line: how many weights came from 16-bit inputs and
        their signal ranks; None when no input was 16-bit."""
        signal = [r.signal_rank for r in self.records if r.signal_rank is not None]
        if not signal:
            return None
        return (f"lssf: {len(signal)} weights from 16-bit inputs; signal rank (singular values above "
                f"the rounding edge) min {min(signal)} / mean {sum(signal) / len(signal):.1f} / max {max(signal)}")

    def kept_words(self) -> Optional[str]:
        """The survival line: the share of the intended term the written weights keep."""
        kept = [r.kept for r in self.records if r.rank > 0]
        if not kept or self.output_dtype is None and all(k == 1.0 for k in kept):
            return None
        return (f"lssf: the written weights keep min {min(kept):.3f} / mean {sum(kept) / len(kept):.3f} "
                "of the intended term along its direction")

    def warnings(self) -> List[str]:
        """Warnings about the whole merge: ranks set by rounding noise, and terms the
        output cast ate (``KEPT_WARNING``), each naming what to change."""
        records, out = self.records, []
        noisy = [r for r in records if r.capped and r.signal_rank is not None
                 and r.signal_rank < SIGNAL_SHARE_WARNING * r.rank]
        if records and len(noisy) > len(records) / 2:
            out.append(
                f"lssf: warning: {len(noisy)} of {len(records)} fused weights are capped by max_rank while "
                "their signal rank is less than half of it: on 16-bit inputs the entropy rule measures "
                "rounding noise. The rank is max_rank's, not the paper's rule's; `spectrum: signal` ranks "
                "the spectrum above the rounding edge instead")
        low = [r for r in records if r.rank > 0 and r.kept < KEPT_WARNING]
        if low:
            names = ", ".join(f"{r.name} ({r.kept:.2f})" for r in low[:5]) + (f" and {len(low) - 5} more" if len(low) > 5 else "")
            out.append(
                f"lssf: warning: {len(low)} written weights keep less than {KEPT_WARNING:g} of their term "
                f"after the output cast: {names}. Write float32 (`out_dtype: float32`), keep "
                "`rounding: subspace`, or apply the repair as a PEFT patch (`mergekit-lssf extract-patch`)")
        return out


STATS = MergeStats()
