"""Per-run record of what the lssf kernel did, for logs and the final summary."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class TensorRecord:
    """One fused tensor: its name, rank, entropy share kept and spectral seconds
    (wall time of the thread that computed them); ``read_ahead``: the spectrum came
    from a read-ahead worker (``read_ahead.py``)."""

    name: str
    rank: int
    capped: bool
    entropy_share: float
    spectral_seconds: float
    read_ahead: bool = False


class MergeStats:
    """Thread-safe collector; mergekit may execute tensors from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: List[TensorRecord] = []
        self.passed_through = 0

    def reset(self) -> None:
        with self._lock:
            self._records = []
            self.passed_through = 0

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
        """One line: tensors fused, min/mean/max rank, seconds of spectral work."""
        records = self.records
        if not records:
            return f"lssf: fused 0 tensors ({self.passed_through} kept from the fine-tune)"
        ranks = [r.rank for r in records]
        capped = sum(r.capped for r in records)
        seconds = sum(r.spectral_seconds for r in records)
        ahead = sum(r.read_ahead for r in records)
        zero = sum(r == 0 for r in ranks)
        return (
            f"lssf: fused {len(records)} tensors ({self.passed_through} kept from the "
            f"fine-tune); rank min {min(ranks)} / mean {sum(ranks) / len(ranks):.1f} / "
            f"max {max(ranks)}; {capped} capped by max_rank; "
            + (f"{zero} at rank 0 (left as the fine-tune's); " if zero else "")
            + f"{seconds:.2f} s in spectral work"
            + (f" ({ahead} spectra computed ahead on worker threads)" if ahead else "")
        )


STATS = MergeStats()
