"""Uniform scalar quantization of weights, and the integer maps the entropy coders use.

    q = round(w / step)   (round half to even, division in float64, per tensor, one float32 step)
    w_hat = q * step

Steps are rounded to float32 before use, so the step stored in a file (32 bits of side
information) reproduces exactly the integers that were coded.

Three ways to choose a step (the paper does not state its step; SPEC.md section 4, OPEN):

* given directly (``step=``);
* from a fixed-length bit budget, :func:`step_for_bits`: ``step = max|w| / (2^(bits-1) - 1)``,
  so ``q`` lies in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` and fits a ``bits``-bit
  fixed-length code (two's complement or sign + magnitude). This is the paper's
  "FL = 10 bits" reference with ``bits = 10`` (step = max|w| / 511);
* from a target relative RMS error, :func:`step_for_rel_error`: the largest step with
  ``||w - w_hat|| / ||w|| <= rel``.

Signed integers are mapped to non-negative ones for the Exp-Golomb and table coders with
:func:`ggprior.codec.bits.zigzag` (0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ...) or split by
:func:`ggprior.codec.bits.sign_magnitude` into a magnitude and a sign bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ggmodel
from .histogram import Histogram, histogram

Q_LIMIT = (1 << 30) - 1
"""Largest |q| the coders accept (zigzag values stay below 2^31)."""

MIN_STEP = float(np.finfo(np.float32).smallest_subnormal)
"""Smallest step (the smallest positive float32): rules that would round a step to 0 use this."""

INCLUDE_CHOICES = ("all", "matrices")


class QuantError(ValueError):
    """A tensor or a step cannot be quantized as asked."""


def _f32(step: float) -> float:
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused by check_step with the tensor's name
        return float(np.float32(step))


def check_step(step: float, name: str = "tensor") -> float:
    """Validate a step (finite, > 0, representable in float32) and return it rounded to float32."""
    s = float(step)
    if not math.isfinite(s) or s <= 0.0:
        raise QuantError(f"{name}: quantization step must be a finite number > 0, got {step!r}")
    s32 = _f32(s)
    if s32 == 0.0 or not math.isfinite(s32):
        raise QuantError(f"{name}: quantization step {step!r} is not representable in float32")
    return s32


def quantize(t: torch.Tensor, step: float | torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """Integers ``round(t / step)`` as int32 on ``t``'s device (step rounded to float32).

    ``step`` is one number, or a float64 tensor of steps (one per value of ``t``, or broadcastable:
    per-row steps from :func:`row_steps_for_rel_error`, already float32 values). The grid is clamped
    to ``t``'s dtype: ``|q| <= floor(finfo.max / step)``, so ``q * step`` cast back to that dtype is
    finite (a value within half a step of the dtype's maximum would otherwise decode to +-inf).
    Raises :class:`QuantError` naming ``name`` for NaN/Inf values or when some |q| would exceed
    ``Q_LIMIT`` (the step is too small for the tensor's range).
    """
    if not isinstance(step, torch.Tensor):
        step = check_step(step, name)
    x = t.detach()
    if not torch.is_floating_point(x):
        raise QuantError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    q = torch.round(x.to(torch.float64) / step)  # float64: a float32 quotient can round to the wrong level
    if q.numel():
        lo, hi = torch.aminmax(q)
        if not (-Q_LIMIT <= float(lo) and float(hi) <= Q_LIMIT):  # also catches NaN
            if not bool(torch.isfinite(x).all()):
                raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
            what = "a row step is" if isinstance(step, torch.Tensor) else f"step {step:g} is"
            raise QuantError(f"{name}: {what} too small for max|w| = {float(x.abs().max()):g} (|q| would exceed {Q_LIMIT})")
        fmax = float(torch.finfo(x.dtype).max)
        if isinstance(step, torch.Tensor):
            top = torch.floor(fmax / step).clamp_(max=Q_LIMIT)
            if bool((q.abs() > top).any()):
                q = torch.minimum(torch.maximum(q, -top), top)
        else:
            top = math.floor(fmax / step)
            if top < Q_LIMIT and max(-float(lo), float(hi)) > top:
                q = q.clamp_(-top, top)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, step: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * step`` in ``dtype`` on ``q``'s device (computed in float64, then cast); ``step`` as in :func:`quantize`."""
    if not isinstance(step, torch.Tensor):
        step = check_step(step)
    return (q.to(torch.float64) * step).to(dtype)


def step_for_bits(t: torch.Tensor, bits: int, *, name: str = "tensor") -> float:
    """Step of a symmetric ``bits``-bit fixed-length quantizer: ``max|t| / (2^(bits-1) - 1)``.

    A tensor of zeros gets step 1.0 (every q is 0). ``bits`` must lie in [2, 31].
    """
    if not isinstance(bits, int) or not 2 <= bits <= 31:
        raise QuantError(f"{name}: bits must be an integer in [2, 31], got {bits!r}")
    x = t.detach()
    if x.numel() == 0:
        return 1.0
    lo, hi = torch.aminmax(x)
    amax = max(-float(lo), float(hi))
    if not math.isfinite(amax):
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
    if amax == 0.0:
        return 1.0
    step = max(_f32(amax / ((1 << (bits - 1)) - 1)), MIN_STEP)  # subnormal weights: never a step of 0
    # float32 rounding of the step may push round(max/step) one level over the budget.
    while amax / step > (1 << (bits - 1)) - 0.5:
        step = float(np.nextafter(np.float32(step), np.float32(np.inf)))
    return step


def rel_error(t: torch.Tensor, step: float, q: torch.Tensor | None = None, *, name: str = "tensor") -> float:
    """Relative RMS quantization error ``||t - q step|| / ||t||`` (0 for an all-zero tensor).

    ``q`` defaults to ``quantize(t, step)``; pass it to save a pass over the tensor.
    """
    x = t.detach().reshape(-1).to(torch.float64)
    norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    if norm == 0.0:
        return 0.0
    s = check_step(step, name)
    xq = torch.round(x / s) if q is None else q.reshape(-1).to(x.dtype)
    return float(torch.linalg.vector_norm(x - xq * s, dtype=torch.float64)) / norm


def step_for_rel_error(
    t: torch.Tensor, rel: float, *, name: str = "tensor", max_values: int = 1 << 20, tol: float = 1e-3
) -> float:
    """The largest step whose relative RMS error ``||w - w_hat|| / ||w||`` stays <= ``rel``.

    Starts from the uniform-noise estimate ``step = sqrt(12) * rel * rms(w)`` and bisects on
    log(step) (to relative precision ``tol``) using an evenly strided subsample of at most
    ``max_values`` values, so the error on the full tensor matches ``rel`` up to sampling
    noise. A tensor of zeros gets step 1.0.
    """
    if not (0.0 < rel < 1.0):
        raise QuantError(f"{name}: relative error must lie in (0, 1), got {rel!r}")
    x = t.detach().reshape(-1)
    if x.numel() == 0:
        return 1.0
    x = x[:: max(1, x.numel() // max_values)].to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
    rms = float(x.pow(2).mean().sqrt())
    if rms == 0.0:
        return 1.0
    guess = math.sqrt(12.0) * rel * rms
    lo, hi = guess / 64.0, guess * 64.0
    lo, hi = max(lo, float(x.abs().max()) / Q_LIMIT, MIN_STEP), max(hi, MIN_STEP)  # subnormals: never 0
    if rel_error(x, hi, name=name) <= rel:
        return _f32(hi)
    for _ in range(64):
        if hi / lo <= 1.0 + tol:
            break
        mid = math.sqrt(lo * hi)
        if rel_error(x, mid, name=name) <= rel:
            lo = mid
        else:
            hi = mid
    return _f32(lo)


ROW_STEP_BITS = 16
"""Per-row steps are bfloat16 values (the top 16 bits of a float32: 128 steps per octave), so a file
stores each as its 16-bit pattern and every reader gets the same float32 step."""


def row_steps_for_rel_error(t: torch.Tensor, rel: float, *, name: str = "tensor", block_values: int = 1 << 20,
                            tol: float = 1e-3) -> np.ndarray:
    """One step per row (dim 0) of ``t``: the largest bfloat16 value whose relative RMS error on that row is <= ``rel``.

    Every row of a ``rows x ...`` tensor gets the same relative error instead of the tensor's.
    Bisection on log(step) for all rows of a block at once (to relative precision ``tol``), then
    the step rounded down to a bfloat16 value, and lowered further (at most 16 values) while the row's
    error exceeds ``rel`` (a short row's error is not monotonic in the step), then, if still over, set to
    ``2 rel rms(row)`` (rounding errs by at most half a step); never below the smallest step keeping
    ``|q| <= Q_LIMIT``. An all-zero row gets step 1.0. Returns float32 steps.
    """
    if not (0.0 < rel < 1.0):
        raise QuantError(f"{name}: relative error must lie in (0, 1), got {rel!r}")
    if t.dim() < 1 or t.shape[0] == 0:
        raise QuantError(f"{name}: per-row steps need a tensor with at least one row, got shape {tuple(t.shape)}")
    x2 = t.detach().reshape(t.shape[0], -1)
    per = max(1, block_values // max(1, x2.shape[1]))
    out = np.empty(x2.shape[0], dtype=np.float32)
    for a in range(0, x2.shape[0], per):
        x = x2[a : a + per].to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
        out[a : a + x.shape[0]] = _bf16(_block_patterns(x, rel, tol))
    return out


def _block_patterns(x: torch.Tensor, rel: float, tol: float) -> np.ndarray:
    """The bfloat16 step patterns of the rows of one float64 block (see :func:`row_steps_for_rel_error`)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    amax = x.abs().amax(1, keepdim=True)
    rms = norm / math.sqrt(max(1, x.shape[1]))
    lo = torch.maximum(math.sqrt(12.0) * rel * rms / 64.0, amax / Q_LIMIT).clamp_(min=MIN_STEP)
    hi = (math.sqrt(12.0) * rel * rms * 64.0).clamp_(min=MIN_STEP)

    def ok(s: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x - torch.round(x / s) * s, dim=1, keepdim=True) <= rel * norm

    lo = torch.where(ok(hi), hi, lo)
    for _ in range(64):
        if float((hi / lo).max()) <= 1.0 + tol:
            break
        mid = torch.sqrt(lo * hi)
        good = ok(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    lo = torch.where(norm == 0, torch.ones_like(lo), lo)
    pat = (lo.reshape(-1).to(torch.float32).numpy().view(np.uint32) >> 16).clip(1, 0x7F7F)
    floor = (amax.reshape(-1) / Q_LIMIT).numpy()
    for _ in range(16):  # the error of a short row is not monotonic in the step: step down until it holds
        bad = ~ok(torch.from_numpy(_bf16(pat).astype(np.float64))[:, None]).reshape(-1).numpy()
        bad &= (_bf16(pat - 1) >= floor) & (pat > 1)
        if not bad.any():
            break
        pat -= bad.astype(np.uint32)
    else:  # still over: a step of 2 rel rms errs by at most rel (each value by at most half a step)
        safe = (2.0 * rel * rms.reshape(-1)).to(torch.float32).numpy()
        pat = np.where(bad, np.maximum(safe.view(np.uint32) >> 16, 1), pat)
    return pat + (_bf16(pat) < floor).astype(np.uint32)  # never |q| over Q_LIMIT


def _bf16(patterns: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns."""
    return (np.asarray(patterns, dtype=np.uint32) << 16).view(np.float32)


def row_step_patterns(steps: np.ndarray) -> np.ndarray:
    """The bfloat16 patterns (int64) of per-row steps from :func:`row_steps_for_rel_error`."""
    return (np.asarray(steps, dtype=np.float32).view(np.uint32) >> 16).astype(np.int64)


def row_steps_from_patterns(patterns: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Float32 row steps from stored bfloat16 patterns; each must be a finite value > 0 (1 to 0x7F7F)."""
    p = np.asarray(patterns, dtype=np.int64)
    if p.size and (int(p.min()) < 1 or int(p.max()) > 0x7F7F):
        raise QuantError(f"{name}: row step patterns must lie in [1, 0x7F7F] (finite steps > 0)")
    return _bf16(p)


def expand_rows(row_steps: torch.Tensor, row_len: int, a: int, b: int) -> torch.Tensor:
    """The step of each flat value ``a..b-1`` of a tensor whose rows of ``row_len`` values have ``row_steps``."""
    return row_steps[torch.arange(a, b) // row_len]


def is_included(name: str, shape: tuple[int, ...], include: str) -> bool:
    """Whether a floating tensor is quantized under an ``include`` policy.

    ``"all"``: every floating tensor; ``"matrices"``: tensors with two or more dimensions
    (norm gains and biases are kept exact, stored in their original dtype).
    """
    if include == "all":
        return True
    if include == "matrices":
        return len(shape) >= 2
    raise QuantError(f"include must be one of {', '.join(INCLUDE_CHOICES)}, got {include!r}")


def choose_step(
    t: torch.Tensor, *, step: float | None = None, bits: int | None = None, rel: float | None = None,
    name: str = "tensor",
) -> float:
    """The float32 step for one tensor from exactly one of ``step``, ``bits`` or ``rel``."""
    given = [v is not None for v in (step, bits, rel)]
    if sum(given) != 1:
        raise QuantError("give exactly one of step, bits or rel_error")
    if step is not None:
        return check_step(step, name)
    if bits is not None:
        return step_for_bits(t, bits, name=name)
    return step_for_rel_error(t, rel, name=name)


DEFAULT_REL_ERROR = 0.005
"""The default rule: a per-tensor step with relative RMS error 0.005, on every floating tensor.

The cheapest measured rule that keeps MiniLM's sentence embeddings at mean cosine >= 0.999
(0.99967) and SmolLM2-135M's perplexity within 0.5% (+0.13%), at 7.90 bits/weight on both;
the old default, the 10-bit grid, gave cosine 0.9974 and +0.89% (docs/results/checkpoints).
MiniLM's nearest neighbours are kept on every query that is not a near-tie (margin above twice what a
bfloat16 cast moves a similarity); 10 of 300 near-tie queries swap, as 4 do under a bfloat16 cast.
"""


def resolve_rule(step: float | None, bits: int | None, rel: float | None) -> tuple[float | None, int | None, float | None]:
    """The step rule with its default: none of ``step``, ``bits``, ``rel`` given means ``rel=DEFAULT_REL_ERROR``."""
    if step is None and bits is None and rel is None:
        rel = DEFAULT_REL_ERROR
    return step, bits, rel


def step_rule(step: float | None, bits: int | None, rel: float | None, per_row: bool = False) -> str:
    """The rule as text (``step=0.002``, ``bits=10``, ``rel_error=0.01``, ``rel_error=0.01 per-row``), as files
    and summaries record it."""
    rows = " per-row" if per_row else ""
    return f"step={step:g}" if step is not None else f"bits={bits}" if bits is not None else f"rel_error={rel:g}{rows}"


@dataclass
class QuantizedTensor:
    """One tensor through the quantizer: float32 step, int32 integers (on the tensor's device),
    their histogram and the GG fitted to it (step units; None when not asked for)."""

    step: float
    q: torch.Tensor
    hist: Histogram
    gg: ggmodel.GGParams | None


def quantize_tensor(
    t: torch.Tensor, *, step: float | None = None, bits: int | None = None, rel: float | None = None,
    gg_fit: str | None = "moment", name: str = "tensor",
) -> QuantizedTensor:
    """The step every coder shares: choose the step, quantize, histogram, fit the GG model.

    Both the code lengths (:func:`ggprior.codec.lengths.measure`) and the file writer
    (:func:`ggprior.codec.container.save_compressed`) quantize through here. ``gg_fit`` is
    ``"moment"``, ``"ml"`` or None (no fit).
    """
    s = choose_step(t, step=step, bits=bits, rel=rel, name=name)
    q = quantize(t, s, name=name)
    h = histogram(q)
    return QuantizedTensor(s, q, h, None if gg_fit is None else ggmodel.fit(h, gg_fit))

