"""One-pass moment sums for the GG moment-ratio fit (numba, float64 accumulators, parallel chunks).

:func:`ggprior.gg.fit` makes two passes: the mean, then ``sum |x - mu|`` and ``sum (x - mu)^2``
around it. Here one pass suffices. Values are centred on a provisional centre ``m`` (the mean
of an evenly strided subsample) and the pass accumulates, per thread, ``sum y`` and
``sum y^2`` (``y = x - m``, float64) plus a fine histogram of ``y`` over ``[-W, W)``
(``BINS`` bins of width ``h``, two overflow bins) holding each bin's count and sum of ``y``.
At the end ``d = mu - m = sum y / n``;
``sum (x - mu)^2 = sum y^2 - n d^2`` and ``sum |x - mu| = sum |y - d|`` is exact, bin by bin,
for every bin that lies wholly on one side of ``d`` (``|y - d|`` is linear there). Only the
bin that holds ``d`` is not: its error is at most ``count x h``; when that bound exceeds
``EXACT_REL`` of the total (a point mass, e.g. many exact zeros, in that bin) or ``d`` falls
outside ``[-W, W]``, a second pass computes ``sum |x - mu|`` exactly. The result is the same
:class:`~ggprior.gg.GGFit` as :func:`ggprior.gg.fit` (gamma equal to about 1e-9 relative).

Speed: the sums run over blocks of 64 values in a branch-free loop that LLVM vectorises
(float64 sums split over SIMD lanes: ``fastmath`` reassociation only, NaN/Inf still propagate),
which marks the band values in a bit mask; only those are binned afterwards, so the band is
kept narrow (``BAND_SIGMAS``, about 1% of the values) and the provisional centre precise (a
``SUBSAMPLE`` of 2^18 values: 0.002 sigma standard error). The two-pass kernels
(:func:`centred_sums`, :func:`value_sum`, behind :func:`ggprior.gg.fit`) are the same loop.

Inputs: float32, float64, float16 NumPy arrays, bfloat16 given as a ``uint16`` view
(``dtype="bfloat16"``), torch tensors of any of these, an iterable of such chunks, or a
safetensors file (:func:`fit_safetensors`, read through a memory map: no copy, no torch).
Non-finite values raise ``ValueError`` like :func:`ggprior.gg.fit`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# The one place where this module names the fit's result type (ggprior.gg.fit after the move).
from .fit import GGFit, MomentAccumulator

BINS = 4096
BAND_SIGMAS = 0.01  # the band histogram covers m +- BAND_SIGMAS x (the subsample's std)
EXACT_REL = 1e-9
SUBSAMPLE = 1 << 18  # its mean is within 0.01 sigma (5 standard errors) of the true one
MIN_PART = 1 << 20  # values per thread below which fewer threads are used

_F16_LUT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_BF16_LUT = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def default_threads() -> int:
    """The CPUs this process may use (affinity), capped by numba's thread count (which
    :func:`ggprior.threads.configure_threads`, i.e. the CLI's ``--threads``, sets), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        n = os.cpu_count() or 1
    return max(1, min(n, numba.get_num_threads()))


@njit(cache=True, nogil=True, inline="always")
def _value(x, lut, i):
    """``x[i]`` as float64, through ``lut`` when it is not None (16-bit codes)."""
    if lut is None:
        return np.float64(x[i])
    return np.float64(lut[x[i]])


@intrinsic
def _lowest_bit(typingctx, mask):
    """The index of the lowest set bit of a non-zero uint64 (LLVM's cttz: one instruction)."""
    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _part(x, lut, lo, hi, m, w, inv_h, cnt, sm):
    """Sums over ``x[lo:hi]`` of y = x - m: (sum y, sum y^2, sum |y|, #y > 0, #y == 0).

    Values with ``0 < |y| < w`` also go to the band histogram (``cnt``, ``sm``). Blocks of 64
    values are summed by a branch-free loop that LLVM vectorises (``reassoc`` lets it split the
    float64 sums over SIMD lanes), which also sets one bit per band value in a 64-bit mask; only
    those values are then binned. A NaN makes ``sum y`` NaN and an Inf makes ``sum y^2`` Inf, so
    the sums alone tell whether every value was finite.
    """
    s1 = s2 = sa = 0.0
    pos = zero = 0
    half = BINS // 2
    for b0 in range(lo, hi, 64):
        blk = x[b0:min(b0 + 64, hi)]  # indexed from 0: no negative-index wraparound, so vector loads
        band = np.uint64(0)
        for i in range(blk.shape[0]):
            y = _value(blk, lut, i) - m
            s1 += y
            s2 += y * y
            sa += abs(y)
            pos += np.int64(y > 0.0)
            zero += np.int64(y == 0.0)
            band |= np.uint64((abs(y) < w) & (y != 0.0)) << np.uint64(i)
        while band:  # the band: 0 on a bin edge, exactly (floor)
            y = _value(blk, lut, _lowest_bit(band)) - m
            band &= band - np.uint64(1)
            j = min(max(np.int64(math.floor(y * inv_h)) + half, 0), BINS - 1)
            cnt[j] += 1
            sm[j] += y
    return s1, s2, sa, pos, zero


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _centred_part(x, lut, lo, hi, c):
    """(sum (x - c), sum |x - c|, sum (x - c)^2) over ``x[lo:hi]`` in float64 (vectorised)."""
    xs = x[lo:hi]  # indexed from 0: no negative-index wraparound, so vector loads
    s1 = sa = sq = 0.0
    for i in range(xs.shape[0]):
        y = _value(xs, lut, i) - c
        s1 += y
        sa += abs(y)
        sq += y * y
    return s1, sa, sq


def _centred(x, centre: float, threads: int | None) -> tuple[float, float, float]:
    """(sum (x - centre), sum |x - centre|, sum (x - centre)^2) of one chunk, in parallel slices."""
    a, lut = _prepare(x, None)
    if not a.size:
        return 0.0, 0.0, 0.0
    c = float(centre)
    nt = default_threads() if threads is None else max(1, int(threads))
    parts = _run_parts(lambda lo, hi: _centred_part(a, lut, lo, hi, c), a.size, nt)
    return tuple(float(sum(p[k] for p in parts)) for k in range(3))


def centred_sums(x, centre: float, *, threads: int | None = None) -> tuple[float, float]:
    """``sum |x - centre|`` and ``sum (x - centre)^2`` of one chunk (array or tensor), in float64.

    The kernel behind :func:`ggprior.gg.fit.centred_sums` (pools of tensors, runtime hooks,
    :func:`ggprior.gg.fit`); NaN/Inf make a sum non-finite, as there.
    """
    return _centred(x, centre, threads)[1:]


def value_sum(x, *, threads: int | None = None) -> float:
    """``sum(x)`` of one chunk in float64 (the mean pass of :func:`ggprior.gg.fit`; NaN/Inf give NaN/Inf)."""
    return _centred(x, 0.0, threads)[0]


def _run_parts(fn, n: int, threads: int) -> list:
    """``fn(lo, hi)`` over ``threads`` contiguous slices of ``range(n)``, in parallel (the kernels release the GIL)."""
    parts = max(1, min(threads, n // MIN_PART))
    bounds = [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]
    if parts == 1:
        return [fn(*bounds[0])]
    with ThreadPoolExecutor(parts) as ex:
        return list(ex.map(lambda b: fn(*b), bounds))


def _sums(a, lut, m, w, inv_h, threads):
    """(sum y, sum y^2, sum |y|, #y > 0, #y == 0, band counts, band sums) over one chunk, in parallel."""
    def one(lo, hi):
        cnt = np.zeros(BINS, dtype=np.int64)
        sm = np.zeros(BINS, dtype=np.float64)
        return (*_part(a, lut, lo, hi, m, w, inv_h, cnt, sm), cnt, sm)

    res = _run_parts(one, a.size, threads)
    return [sum(r[k] for r in res) for k in range(7)]


def _abs_dev(a, lut, mu, threads):
    return sum(p[1] for p in _run_parts(lambda lo, hi: _centred_part(a, lut, lo, hi, mu), a.size, threads))


def _prepare(chunk, dtype: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat array for the kernels, lookup table decoding its 16-bit codes, or None) for one chunk."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(chunk, torch.Tensor):
        t = chunk.detach().reshape(-1).cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), _BF16_LUT
        if t.dtype == torch.float16:
            return t.view(torch.int16).numpy().view(np.uint16), _F16_LUT
        if t.dtype in (torch.float32, torch.float64):
            return t.numpy(), None
        return t.to(torch.float32).numpy(), None
    a = np.asarray(chunk).reshape(-1)
    if dtype in ("bfloat16", "bf16"):
        if a.dtype != np.uint16:
            raise TypeError(f"bfloat16 input must be a uint16 view, got {a.dtype}")
        return a, _BF16_LUT
    if a.dtype == np.float16:
        return a.view(np.uint16), _F16_LUT
    if a.dtype in (np.float32, np.float64):
        return a, None
    if a.dtype.kind in "iub":
        return a.astype(np.float32), None
    raise TypeError(f"cannot fit values of dtype {a.dtype}")


def _abs_dev_from_band(d, w, h, sa, pos, zero, n, cnt, sm) -> float | None:
    """``sum |y - d|`` from the one-pass sums, or None when the band cannot resolve it exactly enough.

    ``|y - d| = |y| - d sign(y)`` except for y strictly between 0 and d (y = 0 counts on the
    side away from d), where ``2 |d - y|`` is added; those values lie in the band histogram, whose
    bins have 0 on an edge. Bins wholly between 0 and d add exactly; the one bin holding d adds
    an estimate whose error is at most ``2 count h``, accepted when below ``EXACT_REL`` of the total.
    """
    if d == 0.0:
        return sa
    if not abs(d) < w - 2 * h:
        return None
    neg = n - pos - zero
    half = BINS // 2
    k = int(math.floor(d / h)) + half  # the bin holding d
    lo_k = (k - half) * h
    if d > 0:
        base = sa - d * pos + d * (neg + zero)
        full = 2.0 * (d * float(cnt[half:k].sum()) - float(sm[half:k].sum()))
        part = float(cnt[k]) * (d - lo_k) ** 2 / h
    else:
        base = sa - d * (pos + zero) + d * neg
        full = 2.0 * (float(sm[k + 1:half].sum()) - d * float(cnt[k + 1:half].sum()))
        part = float(cnt[k]) * (lo_k + h - d) ** 2 / h
    est = base + full + part
    if 2.0 * float(cnt[k]) * h > EXACT_REL * est:
        return None
    return est


def fit_moments(data, *, name: str = "tensor", dtype: str | None = None, threads: int | None = None) -> GGFit:
    """The moment-ratio GG fit of :func:`ggprior.gg.fit` in one pass over the data.

    ``data``: an array or tensor, an iterable of them (chunks of one tensor, each read once), or a
    zero-argument callable returning a fresh iterator of chunks (streamed: no chunk is held
    after its pass; the rare exact second pass calls it again); ``dtype="bfloat16"`` marks ``uint16`` arrays as bfloat16 bit patterns. ``threads``: how many
    slices of each chunk are summed in parallel (threads running GIL-free numba kernels; default:
    the CPUs of this process's affinity mask). Raises ``ValueError`` naming ``name`` for empty,
    constant, NaN or Inf input, like :func:`ggprior.gg.fit`.
    """
    if callable(data) and not _is_single(data):
        def stream():
            for c in data():
                p = _prepare(c, dtype)
                if p[0].size:
                    yield p
    else:
        chunks = [data] if _is_single(data) else list(data)
        prepared = [p for p in (_prepare(c, dtype) for c in chunks) if p[0].size]

        def stream():
            return iter(prepared)
    acc = MomentAccumulator(name)
    n = 0
    tot = [0.0, 0.0, 0.0, 0, 0, np.zeros(BINS, dtype=np.int64), np.zeros(BINS)]
    nt = default_threads() if threads is None else max(1, int(threads))
    for a, lut in stream():
        if n == 0:
            # the provisional centre m and the band's half-width w, from a strided subsample of the first chunk
            sub = a[:: max(8, a.size // SUBSAMPLE)]  # a strided view (no copy) of at most 1/8 of the chunk
            s1, _, s2 = _centred_part(sub, lut, 0, sub.size, _value(sub, lut, 0))  # shifted: no cancellation
            m = _value(sub, lut, 0) + s1 / sub.size
            spread = math.sqrt(max(s2 / sub.size - (s1 / sub.size) ** 2, 0.0))
            if not (math.isfinite(m) and math.isfinite(spread)):
                m = spread = 0.0  # NaN/Inf in the subsample: the pass below finds them and raises
            w = BAND_SIGMAS * spread if spread > 0 else max(abs(m), 1.0) * 1e-3
            if abs(m) <= 0.25 * w:
                m = 0.0  # exact zeros (sparse weights) then sit at y = 0, outside the band
            h = 2 * w / BINS
        n += a.size
        r = _sums(a, lut, m, w, 1.0 / h, nt)
        tot = [t + v for t, v in zip(tot, r, strict=True)]
    if n == 0:
        return acc.fit()  # raises the same error as gg.fit
    s1, s2, sa, pos, zero, cnt, sm = tot
    if not (math.isfinite(s1) and math.isfinite(s2)):
        raise ValueError(f"{name}: contains NaN or Inf values; cannot fit a GG")
    d = s1 / n
    sq_dev = max(s2 - s1 * d, 0.0)
    abs_dev = _abs_dev_from_band(d, w, h, sa, pos, zero, n, cnt, sm)
    if abs_dev is None:
        mu = m + d
        abs_dev = sum(_abs_dev(a, lut, mu, nt) for a, lut in stream())
    acc.n = acc.n2 = n
    acc.s1 = (m + d) * n
    acc.abs_dev = abs_dev
    acc.sq_dev = sq_dev
    return acc.fit()


def _is_single(data) -> bool:
    if isinstance(data, np.ndarray):
        return True
    try:
        import torch

        return isinstance(data, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


_ST_DTYPES = {"F32": (np.float32, None), "F64": (np.float64, None), "F16": (np.float16, None),
              "BF16": (np.uint16, "bfloat16")}


def safetensors_arrays(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, str | None]]:
    """Memory-mapped NumPy views (no copy) of a safetensors file's floating tensors: name -> (array, dtype)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        size = os.fstat(fh.fileno()).st_size
        if hlen > size - 8:
            raise ValueError(f"{path}: header length {hlen} exceeds the file")
        header = json.loads(fh.read(hlen))
    base = 8 + hlen
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _ST_DTYPES:
            continue
        np_dtype, tag = _ST_DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        if not 0 <= b <= e <= size - base:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file")
        out[name] = (np.asarray(mm[base + b: base + e]).view(np_dtype), tag)
    return out


def fit_safetensors(path: str | os.PathLike, names: Iterable[str] | None = None, *,
                    threads: int | None = None) -> dict[str, GGFit]:
    """One-pass moment fits of a safetensors file's floating tensors, streamed from a memory map."""
    arrays = safetensors_arrays(path)
    wanted = list(arrays) if names is None else list(names)
    return {n: fit_moments(arrays[n][0], name=n, dtype=arrays[n][1], threads=threads) for n in wanted}
