"""Histograms of quantized integers, the input of every code-length computation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bits import CodingError

DENSE_RANGE = 1 << 24


@dataclass(frozen=True)
class Histogram:
    """The distinct values of an integer array (ascending, int64) and their counts (int64)."""

    symbols: np.ndarray
    counts: np.ndarray

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def qmin(self) -> int:
        return int(self.symbols[0]) if self.symbols.size else 0

    @property
    def qmax(self) -> int:
        return int(self.symbols[-1]) if self.symbols.size else 0

    def dense(self) -> np.ndarray:
        """Counts of every integer in [qmin, qmax] (zeros for absent values)."""
        out = np.zeros(self.qmax - self.qmin + 1, dtype=np.int64)
        out[self.symbols - self.qmin] = self.counts
        return out

    def entropy_bits(self) -> float:
        """Total empirical (zeroth-order) entropy in bits: -sum c log2(c / n)."""
        n = self.n
        if n == 0:
            return 0.0
        c = self.counts.astype(np.float64)
        return float(-(c * (np.log2(c) - np.log2(n))).sum())


def as_int_array(q: np.ndarray | torch.Tensor) -> np.ndarray:
    """A flat NumPy integer view of ``q`` (torch tensors are moved to CPU)."""
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().numpy()
    a = np.asarray(q).reshape(-1)
    if a.dtype.kind not in "iu":
        raise CodingError(f"expected an integer array, got dtype {a.dtype}")
    return a


def histogram(q: np.ndarray | torch.Tensor) -> Histogram:
    """Histogram of an integer array: O(n) bincount over a dense range, else a sort."""
    a = as_int_array(q)
    if a.size == 0:
        return Histogram(np.zeros(0, np.int64), np.zeros(0, np.int64))
    lo, hi = int(a.min()), int(a.max())
    if hi - lo < DENSE_RANGE:
        c = np.bincount((a.astype(np.int64) - lo), minlength=hi - lo + 1)
        nz = np.flatnonzero(c)
        return Histogram(nz.astype(np.int64) + lo, c[nz].astype(np.int64))
    s, c = np.unique(a.astype(np.int64), return_counts=True)
    return Histogram(s, c.astype(np.int64))
