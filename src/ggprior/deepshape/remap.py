"""DeepShape's exact-count remap with a bucket sort: :func:`reshape_values_fast`, which is the
library's :func:`ggprior.deepshape.reshape_values` (whole models go through it too).

Same signature, output and report as :func:`ggprior.deepshape.reshape.reshape_values_reference`
(the sort-based reference, tested and benchmarked against), whose cost is a stable
``torch.sort`` (values and permutation) and a dozen passes of float64 temporaries. Here:

* the stable sort is a bucket sort (:func:`stable_sort`): one pass histograms the float32 bit
  patterns, made order-preserving, on their top 16 bits (65,536 fine buckets: 128 per octave);
  a second scatters each value's low 16 bits and index into its bucket, in index order; then
  each bucket, small enough to sit in cache, is ordered on its own (insertion sort, or two
  8-bit counting passes) and written out. Every step is stable, so ties keep index order
  exactly as ``torch.sort(stable=True)`` does, and the sorted values and permutation are
  identical to torch's (-0.0 sorts as +0.0, as in torch; the sorted copy holds +0.0 for it,
  which changes no result below). float64 input uses NumPy's stable sort.
* NaN and Inf sort to the ends, so the finiteness check reads two values; the histogram of
  grid levels (the trim, the entropies) is read off the sorted values in one pass, as runs.
* every fit is :func:`ggprior.gg.fit` on the same sorted arrays as the reference's (so the
  target, the counts, every output value and the report's fits are the reference's).
* the remap (tails scaled, target bins filled by rank over each bin's central half, scattered
  back through the permutation) is one numba pass that computes each value with the same
  float64 operations as the reference and writes it straight to its place: bit for bit the
  reference's output.

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
    N_MIN,
    ShapeReport,
    _check_args,
    _entropy,
    _target,
    _trim,
    _work_dtype,
)

_SIGN = np.uint32(0x80000000)
_LOW = np.uint32(0x7FFFFFFF)
_SMALL = 48  # buckets up to this size are ordered by insertion sort


@njit(cache=True, inline="always")
def _key(u):
    """The order-preserving key of a float32 bit pattern (-0.0 as +0.0), without a branch on the
    sign (a branch mispredicts on every other value; the explicit uint32 casts keep numba from
    widening to int64)."""
    u = np.uint32(0) if u == _SIGN else u
    return np.uint32(u ^ (np.uint32(_LOW * np.uint32(u >> np.uint32(31))) | _SIGN))


@njit(cache=True, inline="always")
def _unkey(k):
    """The float32 bit pattern of key ``k`` (inverse of :func:`_key`)."""
    return np.uint32(k ^ (np.uint32(_LOW * np.uint32(np.uint32(1) - (k >> np.uint32(31)))) | _SIGN))


@njit(cache=True)
def _bucket_argsort_f32(bits, low, idx, sorted_bits, order):
    """Stable ascending sort of float32 values given as their uint32 bit patterns.

    Writes the sorted bit patterns (-0.0 as +0.0) to ``sorted_bits`` and the permutation to
    ``order`` (int32 or int64). NaN sorts beyond +-Inf, on the side of its sign bit. ``low``
    (uint16) and ``idx`` (int32), of the same length, are work buffers: from NumPy, whose large
    allocations use transparent huge pages (numba's would fault in every 4 KiB page).
    """
    n = bits.shape[0]
    start = np.zeros(65537, dtype=np.int64)
    for i in range(n):
        start[(_key(bits[i]) >> 16) + 1] += 1
    big = 0
    for b in range(65536):
        big = max(big, start[b + 1])
        start[b + 1] += start[b]
    fill = start[:-1].copy()
    for i in range(n):
        k = _key(bits[i])
        p = fill[k >> 16]
        fill[k >> 16] = p + 1
        low[p] = np.uint16(k & 0xFFFF)
        idx[p] = i
    low2 = np.empty(big, dtype=np.uint16)
    idx2 = np.empty(big, dtype=np.int32)
    h0 = np.empty(256, dtype=np.int64)
    h1 = np.empty(256, dtype=np.int64)
    for b in range(65536):
        lo, hi = start[b], start[b + 1]
        s = hi - lo
        if s == 0:
            continue
        top = np.uint32(b) << 16
        if s <= _SMALL:  # stable insertion sort in place, then out
            for j in range(lo + 1, hi):
                kj, ij = low[j], idx[j]
                t = j
                while t > lo and low[t - 1] > kj:
                    low[t] = low[t - 1]
                    idx[t] = idx[t - 1]
                    t -= 1
                low[t] = kj
                idx[t] = ij
            for j in range(lo, hi):
                k = top | np.uint32(low[j])
                sorted_bits[j] = _unkey(k)
                order[j] = idx[j]
            continue
        h0[:] = 0
        h1[:] = 0
        for j in range(lo, hi):
            h0[low[j] & 0xFF] += 1
            h1[low[j] >> 8] += 1
        a0 = 0
        a1 = lo
        for d in range(256):
            c0, c1 = h0[d], h1[d]
            h0[d] = a0
            h1[d] = a1
            a0 += c0
            a1 += c1
        for j in range(lo, hi):
            d = low[j] & 0xFF
            p = h0[d]
            h0[d] = p + 1
            low2[p] = low[j]
            idx2[p] = idx[j]
        for j in range(s):
            d = low2[j] >> 8
            p = h1[d]
            h1[d] = p + 1
            k = top | np.uint32(low2[j])
            sorted_bits[p] = _unkey(k)
            order[p] = idx2[j]


def _argsort(a: np.ndarray, index_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, stable permutation) of a flat float32/float64 array."""
    if a.dtype == np.float32 and a.size < 2**31:
        sbits, order = np.empty(a.size, np.uint32), np.empty(a.size, index_dtype)
        _bucket_argsort_f32(np.ascontiguousarray(a).view(np.uint32), np.empty(a.size, np.uint16),
                            np.empty(a.size, np.int32), sbits, order)
        return sbits.view(np.float32), order
    order = np.argsort(a, kind="stable")
    return a[order], order


def stable_sort(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(v, stable=True)`` of a finite 1-D CPU float32/float64 tensor: (values, indices)."""
    sv, order = _argsort(v.numpy(), np.int64)
    return torch.from_numpy(sv), torch.from_numpy(order)


@njit(cache=True)
def _level_runs(sv, w):
    """The grid levels ``round(sv / w)`` of sorted values as runs: (levels, counts) of the non-empty
    bins, ascending. ``w`` has ``sv``'s dtype, so the arithmetic is that of ``torch.round(sv / w)``."""
    runs = 0
    prev = np.int64(0)
    for i in range(sv.shape[0]):
        lev = np.int64(np.rint(sv[i] / w))
        if i == 0 or lev != prev:
            runs += 1
            prev = lev
    levels = np.empty(runs, dtype=np.int64)
    counts = np.zeros(runs, dtype=np.int64)
    r = -1
    for i in range(sv.shape[0]):
        lev = np.int64(np.rint(sv[i] / w))
        if r < 0 or lev != levels[r]:
            r += 1
            levels[r] = lev
        counts[r] += 1
    return levels, counts


@njit(cache=True)
def _remap(sv, order, r0, r1, counts, first_bin, w, snap, low_map, high_map, out, out_sorted):
    """The output value of every rank k, written to ``out[order[k]]`` and ``out_sorted[k]``.

    Ranks below ``r0`` and from ``r1`` on are tail values ``edge + (x - origin) * scale`` (a map
    ``(edge, origin, scale)``, or ``None`` to keep them), snapped to the grid with ``snap``; ranks
    in between fill the target bins by rank with ``counts`` (the float64 operations of
    :func:`ggprior.deepshape.reshape._fill`).
    """
    for k in range(r0):
        val = np.float64(sv[k])
        if low_map is not None:
            val = low_map[0] + (val - low_map[1]) * low_map[2]
        if snap:
            val = np.rint(val / w) * w
        out[order[k]] = val
        out_sorted[k] = val
    k = r0
    for b in range(counts.shape[0]):
        c = counts[b]
        left = (np.float64(b) + (first_bin - 0.5)) * w
        step = 0.5 * w / np.float64(max(c, 1))
        base = left + 0.25 * w + step * (0.5 - np.float64(k - r0))
        for _ in range(c):
            val = left + 0.5 * w if snap else base + step * np.float64(k - r0)
            out[order[k]] = val
            out_sorted[k] = val
            k += 1
    for k in range(r1, sv.shape[0]):
        val = np.float64(sv[k])
        if high_map is not None:
            val = high_map[0] + (val - high_map[1]) * high_map[2]
        if snap:
            val = np.rint(val / w) * w
        out[order[k]] = val
        out_sorted[k] = val


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


def _levels(sv: np.ndarray, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    levels, counts = _level_runs(sv, sv.dtype.type(w))
    return torch.from_numpy(levels), torch.from_numpy(counts)


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
    """DeepShape (Algorithm 1) on one group of values, with a bucket sort and a fused remap.

    Same arguments, output (bit for bit) and report as
    :func:`~ggprior.deepshape.reshape.reshape_values_reference`; see it for the method.

    ``exact=False`` fits the core in one pass (:func:`~ggprior.gg.moments.fit_moments`, about
    1e-11 from ``gg.fit``); the output then equals the reference's except where that difference
    moves a rounding (a count between neighbouring bins, the last bit of a scaled tail value).
    It saves no time any more: ``gg.fit``'s two vectorised passes cost about as much.
    """
    _check_args(k_gamma, k_beta, bin_width, tails, rounding)
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    device = x.device
    flat = x.detach().reshape(-1).cpu()
    n = flat.numel()
    if n < 2:
        raise ValueError(f"{name}: needs at least 2 values, got {n}")
    w = float(bin_width)
    sv_np, order = _argsort(flat.to(_work_dtype(flat)).contiguous().numpy(), np.int32 if n < 2**31 else np.int64)
    if not (np.isfinite(sv_np[0]) and np.isfinite(sv_np[-1])):  # NaN and Inf sort to the ends
        raise ValueError(f"{name}: contains NaN or Inf values; cannot reshape")
    sv = torch.from_numpy(sv_np)
    ulev, ucnt = _levels(sv_np, w)
    start, end, a, b, nmin, cut_width = _trim(ulev, ucnt, n_min, w, name)
    core_fit = gg.fit(sv[start:end], name=name) if exact else fit_moments(sv[start:end], name=name)
    t = _target(core_fit, k_gamma, k_beta, w, n, (start, end, a, b), (int(ulev[0]), int(ulev[-1])), tails,
                rounding, name)
    mu, gamma_t, beta_t, r0, r1, ra, rb, a2, lo_edge, hi_edge, counts, tail_scale = t
    low_map = high_map = None
    if tail_scale is not None:
        low_map = (lo_edge, (ra - 0.5) * w, tail_scale[0])
        high_map = (hi_edge, (rb + 0.5) * w, tail_scale[1])

    # float16 / bfloat16 (no NumPy or numba type): values in float64, rounded once to the dtype, as the reference
    store = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float64
    out = np.empty(n, dtype=torch.empty(0, dtype=store).numpy().dtype)
    out_sorted = np.empty(n, dtype=out.dtype)
    _remap(sv_np, order, r0, r1, counts.numpy(), a2, w, snap, low_map, high_map, out, out_sorted)

    work = torch.from_numpy(out_sorted).to(flat.dtype).to(sv.dtype)  # sorted too: the map is monotone
    trimmed = start > 0 or end < n
    after = gg.fit(work, name=name)
    norm, diff = _norms(sv_np, work.numpy())
    report = ShapeReport(
        name=name, numel=n, n_core=end - start, n_low=start, n_high=n - end, n_min=nmin, cut_width=cut_width,
        cut=((a - 0.5) * w, (b + 0.5) * w), new_cut=(lo_edge, hi_edge), core_fit=core_fit,
        target=(mu, beta_t, gamma_t), before=gg.fit(sv, name=name) if trimmed else core_fit, after=after,
        after_core=gg.fit(work[start:end], name=name) if trimmed else after,
        entropy_before=_entropy(ucnt), entropy_after=_entropy(_levels(work.numpy(), w)[1]),
        rel_change=float(diff / norm) if norm > 0 else 0.0,
        bin_width=w,
    )
    return torch.from_numpy(out).to(flat.dtype).reshape(x.shape).to(device), report


# The library's DeepShape on one group of values (``ggprior.deepshape.reshape_values``).
reshape_values = reshape_values_fast
