"""GCT's communication counts (:class:`CommStats`) and the byte counts of the baseline hooks (:func:`counting_hook`)."""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from ..codec import expgolomb
from ..codec.histogram import histogram


@dataclass
class CommStats:
    """Per-worker communication totals; ``steps`` counts iterations (the last bucket of each)."""

    steps: int = 0
    values: int = 0
    payload_bytes: int = 0
    stage2_bytes: int = 0
    wire_bytes: int = 0
    eg0_bits: int = 0
    eg_bits: int = 0
    entropy_bits: float = 0.0
    zeros: int = 0
    raw_buckets: int = 0
    buckets: int = 0
    hook_seconds: float = 0.0
    code_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Totals plus per-step and per-value figures."""
        s = max(self.steps, 1)
        v = max(self.values, 1)
        out = {k: v_ for k, v_ in asdict(self).items() if k != "extra"}
        out.update(bytes_per_step=self.payload_bytes / s, stage2_bytes_per_step=self.stage2_bytes / s,
                   wire_bytes_per_step=self.wire_bytes / s,
                   bits_per_value=8 * self.payload_bytes / v, eg0_bytes_per_step=self.eg0_bits / 8 / s,
                   eg_bytes_per_step=self.eg_bits / 8 / s, entropy_bytes_per_step=self.entropy_bits / 8 / s,
                   zero_frac=self.zeros / v, hook_ms_per_step=1e3 * self.hook_seconds / s,
                   code_ms_per_step=1e3 * self.code_seconds / s)
        out.update(self.extra)
        return out


def _count(stats: CommStats, qn: np.ndarray | None, n: int, detailed: bool) -> None:
    stats.values += n
    if qn is None:
        stats.raw_buckets += 1
        return
    if not detailed:
        return
    h = histogram(qn)
    stats.eg0_bits += expgolomb.total_bits_hist(h.symbols, h.counts, 0)
    stats.eg_bits += expgolomb.best_order(h.symbols, h.counts)[1] if h.n else 0
    stats.entropy_bits += h.entropy_bits()
    zero = np.searchsorted(h.symbols, 0)
    stats.zeros += int(h.counts[zero]) if zero < h.symbols.size and h.symbols[zero] == 0 else 0


def powersgd_elements(state: psgd.PowerSGDState, bucket: dist.GradBucket) -> int:
    """Values the PowerSGD hook allreduces for ``bucket`` this step (before the hook runs)."""
    if state.iter < state.start_powerSGD_iter:
        return bucket.buffer().numel()
    total = 0
    for t in bucket.gradients():
        n = t.shape[0] if t.dim() else 1
        m = t.numel() // max(n, 1)
        r = min(n, m, state.matrix_approximation_rank)
        compress, full, small = psgd._should_compress(n, m, r, state.min_compression_rate)
        total += small if compress else full
    return total


def counting_hook(hook: Callable, stats: CommStats,
                  payload: Callable[[object, dist.GradBucket], int]) -> Callable:
    """Wrap a DDP hook so ``stats`` records ``payload(state, bucket)`` bytes and the hook's time per call."""

    def wrapped(state, bucket: dist.GradBucket):
        n = payload(state, bucket)
        t0 = time.perf_counter()
        fut = hook(state, bucket)
        stats.payload_bytes += n
        stats.wire_bytes += n
        stats.values += bucket.buffer().numel()
        stats.hook_seconds += time.perf_counter() - t0
        if bucket.is_last():
            stats.steps += 1
        return fut

    return wrapped
