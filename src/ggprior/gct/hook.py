"""GCT: a DDP communication hook that sends entropy-coded, rate-constrained gradients.

Per gradient bucket, on every worker (:func:`gct_hook`):

1. error feedback: x = g + e, e the quantization error this worker left in this bucket last step;
2. step = ``rel_step`` * RMS(x), one float32 per message; q = :func:`~.codec.rate_quantize` (x, step,
   ``lam``) -- plain rounding, or the rate-constrained choice when ``lam > 0``; e <- x - step q;
3. the integers are entropy-coded (``coder``: ``ans`` or ``eg``) into a frame, the frames of all
   workers exchanged (:func:`exchange`: all_gather of the lengths, then of the zero-padded bytes),
   every frame decoded and the mean of step_r q_r written back into the bucket;
4. optional gradient-rate term (``grad_rate`` > 0, backslash-notes.md "GCT"): the rate R = ||g||_1
   of the gradient has gradient H sign(g); H is approximated by a diagonal secant estimate
   h = clamp(dg / dtheta, 0, ``h_max``) from consecutive steps' averaged gradients and parameters
   (identical on every worker, so no extra communication), smoothed by an EMA, and
   ``grad_rate`` * h * sign(g) is added to the averaged gradient.

Counts (:class:`CommStats`): bytes each worker sends per step (its frame), padded wire bytes, and
for the same integers the Exp-Golomb order-0 and best-order sizes and the zeroth-order entropy
(from the histogram, so one coder is run, every size is known). Baseline hooks (plain allreduce,
fp16, PowerSGD) are wrapped by :func:`counting_hook` with their payload sizes.
"""


import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from ..codec import expgolomb
from ..codec.histogram import histogram
from ..codec.quantizer import check_step
from .codec import CODERS, decode_frame, encode_frame, rate_quantize


class GCTError(RuntimeError):
    """A distributed run that cannot go on: bad settings, or a worker that died or timed out."""


@dataclass
class GCTConfig:
    """GCT settings (see the module docstring)."""

    coder: str = "ans"
    rel_step: float = 0.05
    lam: float = 0.0
    error_feedback: bool = True
    grad_rate: float = 0.0
    h_max: float = 100.0
    ema: float = 0.9

    def validate(self) -> None:
        if self.coder not in CODERS:
            raise GCTError(f"unknown gradient coder {self.coder!r}; known: {', '.join(CODERS)}")
        if not (self.rel_step > 0 and self.lam >= 0 and self.grad_rate >= 0 and self.h_max > 0 and 0 <= self.ema < 1):
            raise GCTError(f"need rel_step > 0, lam >= 0, grad_rate >= 0, h_max > 0, 0 <= ema < 1: {self}")


@dataclass
class CommStats:
    """Per-worker communication totals; ``steps`` counts iterations (the last bucket of each)."""

    steps: int = 0
    values: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    eg0_bits: int = 0
    eg_bits: int = 0
    entropy_bits: float = 0.0
    zeros: int = 0
    hook_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Totals plus per-step and per-value figures."""
        s = max(self.steps, 1)
        v = max(self.values, 1)
        out = {k: v_ for k, v_ in asdict(self).items() if k != "extra"}
        out.update(bytes_per_step=self.payload_bytes / s, wire_bytes_per_step=self.wire_bytes / s,
                   bits_per_value=8 * self.payload_bytes / v, eg0_bytes_per_step=self.eg0_bits / 8 / s,
                   eg_bytes_per_step=self.eg_bits / 8 / s, entropy_bytes_per_step=self.entropy_bits / 8 / s,
                   zero_frac=self.zeros / v, hook_ms_per_step=1e3 * self.hook_seconds / s)
        return out


class GCTState:
    """What :func:`gct_hook` keeps between steps: residuals, secant history and the counts."""

    def __init__(self, config: GCTConfig | None = None, process_group: dist.ProcessGroup | None = None):
        self.config = config or GCTConfig()
        self.config.validate()
        self.group = process_group
        self.residual: dict[int, torch.Tensor] = {}
        self.prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.curv: dict[int, torch.Tensor] = {}
        self.stats = CommStats()


def _frombytes(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def exchange(payload: bytes, group: dist.ProcessGroup | None = None,
             device: torch.device | str = "cpu") -> list[bytes]:
    """Every worker's ``payload`` (rank order): all_gather of the lengths, then of the padded bytes.

    Raises :class:`GCTError` when a collective fails (a worker died or the group's timeout passed).
    """
    device = torch.device(device)
    rank = dist.get_rank(group)
    try:
        world = dist.get_world_size(group)
        n = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        lens = [int(s) for s in sizes]
        buf = torch.zeros(max(lens), dtype=torch.uint8, device=device)
        if payload:
            buf[: len(payload)] = _frombytes(payload, device)
        outs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(outs, buf, group=group)
    except RuntimeError as e:
        raise GCTError(f"rank {rank}: gradient exchange failed -- a worker died or did not answer within "
                       f"the process group's timeout ({type(e).__name__}: {e})") from e
    return [o[:k].cpu().numpy().tobytes() for o, k in zip(outs, lens, strict=True)]


def _flat_params(bucket: dist.GradBucket, numel: int) -> torch.Tensor:
    flat = torch.cat([p.detach().reshape(-1).float() for p in bucket.parameters()])
    if flat.numel() != numel:
        raise GCTError(f"bucket {bucket.index()}: parameters hold {flat.numel()} values, the buffer {numel}")
    return flat


def _secant_term(state: GCTState, bucket: dist.GradBucket, g: torch.Tensor) -> torch.Tensor:
    """grad_rate * h * sign(g), h the EMA of the clamped diagonal secant curvature (0 on the first step)."""
    cfg, idx = state.config, bucket.index()
    theta = _flat_params(bucket, g.numel())
    prev = state.prev.get(idx)
    state.prev[idx] = (theta, g.clone())
    if prev is None:
        return torch.zeros_like(g)
    dth, dg = theta - prev[0], g - prev[1]
    moved = dth.abs() > 1e-12
    h = torch.where(moved, dg / torch.where(moved, dth, torch.ones_like(dth)), torch.zeros_like(dg))
    h = h.clamp_(0.0, cfg.h_max)
    curv = state.curv.get(idx)
    curv = h if curv is None else curv.mul_(cfg.ema).add_(h, alpha=1 - cfg.ema)
    state.curv[idx] = curv
    return cfg.grad_rate * curv * torch.sign(g)


def _count(stats: CommStats, q: np.ndarray, frame: bytes, frames: list[bytes]) -> None:
    h = histogram(q)
    stats.values += q.size
    stats.payload_bytes += len(frame)
    stats.wire_bytes += 8 + max(len(f) for f in frames)
    stats.eg0_bits += expgolomb.total_bits_hist(h.symbols, h.counts, 0)
    stats.eg_bits += expgolomb.best_order(h.symbols, h.counts)[1] if h.n else 0
    stats.entropy_bits += h.entropy_bits()
    zero = np.searchsorted(h.symbols, 0)
    stats.zeros += int(h.counts[zero]) if zero < h.symbols.size and h.symbols[zero] == 0 else 0


def gct_hook(state: GCTState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: quantize, entropy-code, exchange, decode and average one bucket."""
    t0 = time.perf_counter()
    cfg, idx = state.config, bucket.index()
    buf = bucket.buffer()
    x = buf.detach().float()
    if cfg.error_feedback and idx in state.residual:
        x = x + state.residual[idx]
    rms = float(x.square().mean().sqrt()) if x.numel() else 0.0
    step = check_step(cfg.rel_step * rms if rms > 0 and math.isfinite(rms) else 1.0, f"bucket {idx}")
    q = rate_quantize(x, step, cfg.lam)
    if cfg.error_feedback:
        state.residual[idx] = x - q.to(x.dtype) * step
    qn = q.cpu().numpy()
    frame = encode_frame(qn, step, cfg.coder)
    frames = exchange(frame, state.group, buf.device)
    total = torch.zeros_like(x)
    for f in frames:
        qr, sr = decode_frame(f)
        total += torch.from_numpy(qr).to(x.device, x.dtype) * sr
    avg = total / len(frames)
    if cfg.grad_rate > 0:
        avg = avg + _secant_term(state, bucket, avg)
    buf.copy_(avg)
    _count(state.stats, qn, frame, frames)
    state.stats.hook_seconds += time.perf_counter() - t0
    if bucket.is_last():
        state.stats.steps += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


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
