"""DeepShape's exact-count remap without a comparison sort: :func:`reshape_values_fast`, which is
the library's :func:`ggprior.deepshape.reshape_values` (whole models go through it too).

Same signature, output and report as :func:`ggprior.deepshape.reshape.reshape_values_reference`
(the sort-based reference, tested and benchmarked against). Its cost was a stable ``torch.sort`` (values and permutation) and a dozen
passes of float64 temporaries. Here:

* the stable sort is a least-significant-digit radix sort (three counting-sort passes of
  11/11/10 bits over the float32 bit patterns made order-preserving; a bucket sort in which
  every bucket's order is resolved by the next digit). Radix sorting is stable by
  construction, so ties keep index order exactly as ``torch.sort(stable=True)`` does, and the
  sorted values and permutation are identical to torch's. (-0.0 sorts as +0.0, as in torch;
  the sorted copy holds +0.0 for it, which changes no result below.) float64 input uses
  NumPy's stable sort.
* the remap itself (target bins filled by rank, spread over each bin's central half, scattered
  back through the permutation) is one numba pass that computes each value with the same
  float64 operations as ``deepshape._fill`` and writes it straight to its place: bit for bit
  the reference's output.
* the core fit is :func:`ggprior.gg.fit` on the same sorted core (so the target, the counts
  and every output value are those of the reference); the report's other fits
  (``before``, ``after``, ``after_core``) use the one-pass :func:`ggprior.gg.moments.fit_moments`,
  equal to ``gg.fit`` to about 1e-9 relative.

Runs on CPU tensors (others are moved to CPU and back).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .. import gg
from ..gg.moments import fit_moments
from .reshape import (
    BIN_WIDTH,
    MAX_BINS,
    MIN_BETA_BINS,
    N_MIN,
    ROUNDINGS,
    ShapeReport,
    _check_args,
    _sorted_entropy,
    _trim,
    _work_dtype,
)

_SIGN = np.uint32(0x80000000)


@njit(cache=True)
def _radix_argsort_f32(bits, keys, k1, i1, i2, out):
    """Stable ascending sort of float32 values given as their uint32 bit patterns (no NaN).

    Returns (sorted values' bit patterns in ``k1``, with -0.0 as +0.0; the permutation in ``out``,
    int64). The work buffers (``keys``, ``k1`` uint32; ``i1``, ``i2`` int32; ``out`` int64, all of
    length n) come from NumPy, whose large allocations use transparent huge pages.
    """
    n = bits.shape[0]
    h0 = np.zeros(2048, dtype=np.int64)
    h1 = np.zeros(2048, dtype=np.int64)
    h2 = np.zeros(1024, dtype=np.int64)
    for i in range(n):
        u = bits[i]
        if u == _SIGN:
            u = np.uint32(0)
        k = (u ^ _SIGN) if (u & _SIGN) == 0 else ~u
        keys[i] = k
        h0[k & 0x7FF] += 1
        h1[(k >> 11) & 0x7FF] += 1
        h2[k >> 22] += 1
    for h in (h0, h1, h2):
        acc = 0
        for j in range(h.shape[0]):
            c = h[j]
            h[j] = acc
            acc += c
    # the first two passes carry int32 indices (half the memory traffic), the last writes int64
    for i in range(n):
        k = keys[i]
        d = k & 0x7FF
        p = h0[d]
        h0[d] = p + 1
        k1[p] = k
        i1[p] = i
    for i in range(n):
        k = k1[i]
        d = (k >> 11) & 0x7FF
        p = h1[d]
        h1[d] = p + 1
        keys[p] = k
        i2[p] = i1[i]
    for i in range(n):
        k = keys[i]
        d = k >> 22
        p = h2[d]
        h2[d] = p + 1
        k1[p] = (k ^ _SIGN) if (k & _SIGN) != 0 else ~k
        out[p] = i2[i]
    return k1, out


def stable_sort(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(v, stable=True)`` of a finite 1-D CPU float32/float64 tensor: (values, indices)."""
    a = v.numpy()
    if a.dtype == np.float32 and a.size < 2**31:
        n = a.size
        sbits, order = _radix_argsort_f32(
            np.ascontiguousarray(a).view(np.uint32), np.empty(n, np.uint32), np.empty(n, np.uint32),
            np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int64))
        return torch.from_numpy(sbits.view(np.float32)), torch.from_numpy(order)
    order = np.argsort(a, kind="stable")
    return torch.from_numpy(a[order]), torch.from_numpy(order)


@njit(cache=True)
def _fill_scatter(counts, first_bin, w, snap, order, r0, out, out_sorted):
    """Core values by rank into ``out[order[r0 + k]]`` and ``out_sorted[r0 + k]`` (float64 ops of ``_fill``)."""
    nb = counts.shape[0]
    k = 0
    for b in range(nb):
        c = counts[b]
        left = (np.float64(b) + (first_bin - 0.5)) * w
        if snap:
            for _ in range(c):
                val = left + 0.5 * w
                out[order[r0 + k]] = val
                out_sorted[r0 + k] = val
                k += 1
        else:
            step = 0.5 * w / np.float64(max(c, 1))
            base = left + 0.25 * w + step * (0.5 - np.float64(k))
            for _ in range(c):
                val = base + step * np.float64(k)
                out[order[r0 + k]] = val
                out_sorted[r0 + k] = val
                k += 1


@njit(cache=True)
def _norms(sv, work):
    """(||sv||, ||work - sv||) in float64 (the report's relative change), one pass."""
    a = 0.0
    b = 0.0
    for i in range(sv.shape[0]):
        x = np.float64(sv[i])
        d = np.float64(work[i]) - x
        a += x * x
        b += d * d
    return np.sqrt(a), np.sqrt(b)


@njit(cache=True)
def _scatter(src, order, r0, out, out_sorted):
    for j in range(src.shape[0]):
        out[order[r0 + j]] = src[j]
        out_sorted[r0 + j] = src[j]


def reshape_values_fast(
    x: torch.Tensor,
    k_gamma: float,
    k_beta: float,
    *,
    bin_width: float = BIN_WIDTH,
    n_min: int | float = N_MIN,
    tails: str = "scale",
    snap: bool = False,
    rounding: str = "cumulative",
    name: str = "tensor",
    exact: bool = True,
) -> tuple[torch.Tensor, ShapeReport]:
    """DeepShape (Algorithm 1) on one group of values, with a radix sort and a fused remap.

    Same arguments, output (bit for bit) and report as
    :func:`~ggprior.deepshape.reshape.reshape_values_reference`; see it for the method.

    ``exact=False`` also fits the core in one pass (:func:`~ggprior.gg.moments.fit_moments`,
    about 1e-11 from ``gg.fit``): faster, and the output then equals the reference's except
    where that difference moves a rounding (a count between neighbouring bins, the last bit of
    a scaled tail value).
    """
    _check_args(k_gamma, k_beta, bin_width, tails, rounding)
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    device = x.device
    flat = x.detach().reshape(-1).cpu()
    n = flat.numel()
    if n < 2:
        raise ValueError(f"{name}: needs at least 2 values, got {n}")
    v = flat.to(_work_dtype(flat)).contiguous()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: contains NaN or Inf values; cannot reshape")
    w = float(bin_width)

    sv, order = stable_sort(v)
    lev = torch.round(sv / w).to(torch.int64)
    start, end, nmin, cut_width = _trim(lev, n_min, w, name)
    a, b = int(lev[start]), int(lev[end - 1])
    core_fit = gg.fit(sv[start:end], name=name) if exact else fit_moments(sv[start:end], name=name)
    mu = core_fit.mu
    gamma_t, beta_t = k_gamma * core_fit.gamma, k_beta * core_fit.beta
    if not gg.GAMMA_MIN <= gamma_t <= gg.GAMMA_MAX:
        raise ValueError(
            f"{name}: target gamma {gamma_t:.4g} = {k_gamma} x {core_fit.gamma:.4g} lies outside "
            f"[{gg.GAMMA_MIN}, {gg.GAMMA_MAX}]"
        )
    if beta_t < MIN_BETA_BINS * w:
        raise ValueError(
            f"{name}: target beta {beta_t:.4g} is too narrow for bin width {w:.4g} (needs >= {MIN_BETA_BINS} bins "
            "per beta to hit the target shape); use a smaller bin width"
        )
    r0, r1, ra, rb = (0, n, int(lev[0]), int(lev[-1])) if tails == "reshape" else (start, end, a, b)
    if tails == "keep":
        a2, b2 = a, b
    else:
        q = torch.tensor([max(r0, 0.5) / n, 1.0 - max(n - r1, 0.5) / n], dtype=torch.float64)
        lo_t, hi_t = (float(t) for t in gg.ppf(q, mu, beta_t, gamma_t))
        if not (abs(lo_t) + abs(hi_t)) / w < MAX_BINS:
            raise ValueError(f"{name}: the target range [{lo_t:.4g}, {hi_t:.4g}] needs more than {MAX_BINS:,} bins "
                             f"of width {w:.4g}; use a larger bin width")
        a2, b2 = round(lo_t / w + 0.5), round(hi_t / w + 0.5) - 1
    lo_edge, hi_edge = (a2 - 0.5) * w, (b2 + 0.5) * w
    if b2 - a2 >= MAX_BINS:
        raise ValueError(f"{name}: the remapped range needs {b2 - a2 + 1:,} bins of width {w:.4g} "
                         f"(at most {MAX_BINS:,}); use a larger bin width")
    if b2 < a2 or not lo_edge < mu < hi_edge:
        raise ValueError(
            f"{name}: target beta {beta_t:.4g} is too narrow for bin width {w:.4g}; use a smaller bin width"
        )
    edges = (torch.arange(a2, b2 + 2, dtype=torch.float64) - 0.5) * w
    probs = torch.diff(gg.cdf(edges, mu, beta_t, gamma_t))
    if float(probs.sum()) <= 0.0:
        raise ValueError(f"{name}: the target puts no mass on bins {a2}..{b2}; check k_gamma/k_beta")
    counts = ROUNDINGS[rounding](probs, r1 - r0)
    low, high = sv[:r0].to(torch.float64), sv[r1:].to(torch.float64)
    if tails == "scale":
        lo_f, hi_f = (float(t) - mu for t in gg.ppf(q, mu, core_fit.beta, core_fit.gamma))
        low = lo_edge + (low - (ra - 0.5) * w) * ((lo_t - mu) / lo_f)
        high = hi_edge + (high - (rb + 0.5) * w) * ((hi_t - mu) / hi_f)
    if snap:
        low, high = torch.round(low / w) * w, torch.round(high / w) * w

    # float16 / bfloat16 (no NumPy or numba type): values in float64, rounded once to the dtype, as the reference
    store = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float64
    out = np.empty(n, dtype=torch.empty(0, dtype=store).numpy().dtype)
    out_sorted = np.empty(n, dtype=out.dtype)
    order_np = order.numpy()
    _scatter(low.to(store).numpy(), order_np, 0, out, out_sorted)
    _fill_scatter(counts.numpy(), a2, w, snap, order_np, r0, out, out_sorted)
    _scatter(high.to(store).numpy(), order_np, r1, out, out_sorted)

    work = torch.from_numpy(out_sorted).to(flat.dtype).to(v.dtype)  # sorted too: the map is monotone
    trimmed = start > 0 or end < n
    after = fit_moments(work, name=name)
    norm, diff = _norms(sv.numpy(), work.numpy())
    report = ShapeReport(
        name=name, numel=n, n_core=end - start, n_low=start, n_high=n - end, n_min=nmin, cut_width=cut_width,
        cut=((a - 0.5) * w, (b + 0.5) * w), new_cut=(lo_edge, hi_edge), core_fit=core_fit,
        target=(mu, beta_t, gamma_t), before=fit_moments(sv, name=name) if trimmed else core_fit, after=after,
        after_core=fit_moments(work[start:end], name=name) if trimmed else after,
        entropy_before=_sorted_entropy(lev),
        entropy_after=_sorted_entropy(torch.round(work / w).to(torch.int64)),
        rel_change=float(diff / norm) if norm > 0 else 0.0,
        bin_width=w,
    )
    return torch.from_numpy(out).to(flat.dtype).reshape(x.shape).to(device), report


# The library's DeepShape on one group of values (``ggprior.deepshape.reshape_values``).
reshape_values = reshape_values_fast
