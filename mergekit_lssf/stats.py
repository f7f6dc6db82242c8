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
    written weight keeps (1.0 for a float32 output). ``fusion: contrastive`` only:
    ``term_ratio`` = ``||alpha term|| / ||W_aligned - W_ft||``, ``wanted_rank`` the
    entropy rule's ``k`` over the whole ``mu`` before the stored count capped it
    (``capped``; None without the rule) and ``site`` the input site in the file."""

    name: str
    rank: int
    capped: bool
    entropy_share: float
    spectral_seconds: float
    rounding_edge: Optional[float] = None
    signal_rank: Optional[int] = None
    kept: float = 1.0
    fusion: Optional[str] = None
    term_ratio: Optional[float] = None
    wanted_rank: Optional[int] = None
    site: Optional[str] = None


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


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
        capped = sum(r.capped for r in records if r.fusion != "contrastive")
        seconds = sum(r.spectral_seconds for r in records)
        zero = sum(r == 0 for r in ranks)
        lines = [
            f"lssf: fused {len(records)} tensors ({self.passed_through} kept from the "
            f"fine-tune); rank min {min(ranks)} / mean {sum(ranks) / len(ranks):.1f} / "
            f"max {max(ranks)}; {capped} capped by max_rank; "
            + (f"{zero} at rank 0 (left as the fine-tune's); " if zero else "")
            + f"{seconds:.2f} s in spectral work"
        ]
        for words in (self.contrastive_words(), self.precision_words(), self.kept_words()):
            if words:
                lines.append(words)
        return "\n".join(lines)

    def contrastive_words(self) -> Optional[str]:
        """The contrastive line: ``k`` per weight and the term's norm against
        ``||W_aligned - W_ft||``, min / median / max over the weights (with the weight
        of the largest ratio); None when no weight was fused contrastively."""
        records = [r for r in self.records if r.term_ratio is not None]
        if not records:
            return None
        ks = [r.rank for r in records]
        ratios = [r.term_ratio for r in records]
        top = max(records, key=lambda r: r.term_ratio)
        return (f"lssf: contrastive: {len(records)} weights; k min {min(ks)} / median {_median(ks):g} / max {max(ks)}; "
                f"||term|| / ||W_aligned - W_ft|| min {min(ratios):.3g} / median {_median(ratios):.3g} / max "
                f"{max(ratios):.3g} ({top.name})")

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
        """Warnings about the whole merge: contrastive sites where ``rank_rule: entropy``
        wanted more vectors than the calibration stores (one line, each site with both
        numbers), ranks set by rounding noise, and terms the output cast ate
        (``KEPT_WARNING``), each naming what to change."""
        records, out = self.records, []
        short = {}  # site -> (wanted, stored): the entropy rule over mu wanted more than the file stores
        for r in records:
            if r.fusion == "contrastive" and r.capped and r.wanted_rank is not None:
                short.setdefault(r.site or r.name, (r.wanted_rank, r.rank))
        if short:
            sites = sorted(short)
            named = "; ".join(f"{s} wants {short[s][0]}, stores {short[s][1]}" for s in sites[:5])
            out.append(
                f"lssf: warning: `rank_rule: entropy` over mu wants more vectors than the calibration stores at "
                f"{len(sites)} input sites ({named}{f'; and {len(sites) - 5} more' if len(sites) > 5 else ''}); the "
                "stored ones were used: calibrate with a larger --max-rank (or `full`) to keep them")
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
