"""The rANS coder's frequency tables: integer-exact quantization and a compact serialization.

A table ``freqs`` (uint32) over the alphabet ``0 .. len - 1`` sums to ``1 << prob_bits``
(``MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS``). :func:`quantize_freqs` makes one from counts or
probabilities, integer-exactly; :func:`check_freqs` validates one; :func:`pack_freqs` /
:func:`unpack_freqs` store it compactly, so a file can carry its own table and never recompute a
float model at read time. The coder itself is :mod:`.rans` (kernels in :mod:`.rans_kernels`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .bits import CodingError, padded
from .expgolomb import _decode as _eg_decode
from .expgolomb import _encode as _eg_encode

PROB_BITS = 16
MIN_PROB_BITS = 8
MAX_PROB_BITS = 16
NSYM_MAX = 1 << 20


# ----------------------------------------------------------------------------- quantization


@njit(cache=True)
def _better_inc(c: np.ndarray, f: np.ndarray, i: int, j: int) -> bool:
    """Whether incrementing f[i] gains more than incrementing f[j]: 2c/(2f+1), exact, ties to lower index."""
    a = 2 * c[i] * (2 * f[j] + 1)
    b = 2 * c[j] * (2 * f[i] + 1)
    return a > b or (a == b and i < j)


@njit(cache=True)
def _better_dec(c: np.ndarray, f: np.ndarray, i: int, j: int) -> bool:
    """Whether decrementing f[i] costs less than decrementing f[j]: 2c/(2f-1), exact, ties to lower index."""
    a = c[i] * (2 * f[j] - 1)
    b = c[j] * (2 * f[i] - 1)
    return a < b or (a == b and i < j)


@njit(cache=True)
def _sift_down(heap: np.ndarray, size: int, k: int, c: np.ndarray, f: np.ndarray, inc: bool) -> None:
    while True:
        left = 2 * k + 1
        if left >= size:
            return
        best = left
        right = left + 1
        if right < size:
            if inc:
                if _better_inc(c, f, heap[right], heap[left]):
                    best = right
            elif _better_dec(c, f, heap[right], heap[left]):
                best = right
        if inc:
            if not _better_inc(c, f, heap[best], heap[k]):
                return
        elif not _better_dec(c, f, heap[best], heap[k]):
            return
        heap[k], heap[best] = heap[best], heap[k]
        k = best


@njit(cache=True)
def _quantize(c: np.ndarray, total: int) -> np.ndarray:
    """Integer frequencies summing to ``total`` for non-negative integer counts ``c`` (sum >= 1).

    Proportional floor, every present symbol raised to 1, then the remainder placed (or the
    excess removed) one unit at a time where it changes the code length least (the marginal
    cost ``c / f`` compared exactly in integers; ties go to the lower index), so the result is
    a deterministic function of the counts on every platform.
    """
    n = c.shape[0]
    s = 0
    for i in range(n):
        s += c[i]
    f = np.zeros(n, dtype=np.int64)
    assigned = 0
    for i in range(n):
        if c[i] > 0:
            # c[i] * total may exceed 2^63 for huge counts: split the product.
            q = (c[i] // s) * total + ((c[i] % s) * total) // s
            f[i] = max(q, 1)
            assigned += f[i]
    d = total - assigned
    if d == 0:
        return f
    inc = d > 0
    heap = np.empty(n, dtype=np.int64)
    size = 0
    for i in range(n):
        if c[i] > 0 and (inc or f[i] > 1):
            heap[size] = i
            size += 1
    for k in range(size // 2 - 1, -1, -1):
        _sift_down(heap, size, k, c, f, inc)
    while d != 0:
        i = heap[0]
        if inc:
            f[i] += 1
            d -= 1
        else:
            f[i] -= 1
            d += 1
            if f[i] == 1:  # cannot go lower: drop it from the heap
                size -= 1
                heap[0] = heap[size]
        _sift_down(heap, size, 0, c, f, inc)
    return f


def _as_counts(x: np.ndarray) -> np.ndarray:
    """Counts (int64) from integer counts or float probabilities (scaled to 2^40, exact IEEE steps)."""
    a = np.asarray(x).reshape(-1)
    if a.dtype.kind in "iub":
        c = a.astype(np.int64)
        if c.size and int(c.min()) < 0:
            raise CodingError("rANS: counts must be non-negative")
        if c.size and int(c.max()) >= 1 << 46:
            # keep products of counts and frequencies below 2^63
            c = c >> np.int64(int(c.max()).bit_length() - 46)  # noqa: E501 (present symbols are raised to 1 anyway)
            c = np.where((a.astype(np.int64) > 0) & (c == 0), 1, c)
        return c
    if a.dtype.kind != "f":
        raise CodingError(f"rANS: expected counts or probabilities, got dtype {a.dtype}")
    p = a.astype(np.float64)
    if not np.all(np.isfinite(p)) or (p.size and float(p.min()) < 0):
        raise CodingError("rANS: probabilities must be finite and non-negative")
    s = float(p.sum())
    if s <= 0 or not math.isfinite(s):
        raise CodingError("rANS: probabilities must have a positive finite sum")
    c = np.rint(p / s * float(1 << 40)).astype(np.int64)
    return np.where((p > 0) & (c == 0), 1, c)


def quantize_freqs(counts_or_probs: np.ndarray, prob_bits: int = PROB_BITS) -> np.ndarray:
    """The coder's frequency table (uint32, sum ``1 << prob_bits``) for counts or probabilities.

    Every symbol with a nonzero input gets a frequency >= 1, absent symbols get 0. Deterministic
    and integer-exact: integer counts go through integer arithmetic only, float probabilities are
    first scaled to integers with correctly rounded IEEE operations. No entry may equal the total
    (a certain symbol would cost 0 bits and make the stream length bound meaningless), so when a
    single symbol is present, the neighbouring symbol (index 1, or 0 when it is index 0's
    neighbour) gets frequency 1. The alphabet needs at least two symbols.
    """
    _check_prob_bits(prob_bits)
    c = _as_counts(counts_or_probs)
    if c.size < 2:
        raise CodingError(f"rANS: the alphabet needs at least 2 symbols, got {c.size}")
    if c.size > NSYM_MAX:
        raise CodingError(f"rANS: alphabet of {c.size} symbols exceeds {NSYM_MAX}")
    nz = np.flatnonzero(c)
    if nz.size == 0:
        raise CodingError("rANS: all counts are zero")
    if nz.size > 1 << prob_bits:
        raise CodingError(f"rANS: {nz.size} present symbols do not fit a table of 2^{prob_bits}")
    if nz.size == 1:
        c = np.zeros(c.size, dtype=np.int64)
        c[nz[0]] = 1 << 40
        c[1 if nz[0] == 0 else 0] = 1
    f = _quantize(np.ascontiguousarray(c), 1 << prob_bits)
    return f.astype(np.uint32)


def _check_prob_bits(prob_bits: object) -> int:
    if not isinstance(prob_bits, (int, np.integer)) or not MIN_PROB_BITS <= int(prob_bits) <= MAX_PROB_BITS:
        raise CodingError(f"rANS: prob_bits must be an integer in [{MIN_PROB_BITS}, {MAX_PROB_BITS}], got {prob_bits!r}")
    return int(prob_bits)


def check_freqs(freqs: np.ndarray) -> tuple[np.ndarray, int]:
    """Validate a frequency table; returns (freqs as int64, prob_bits)."""
    a = np.asarray(freqs)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise CodingError(f"rANS: freqs must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    if not 2 <= a.size <= NSYM_MAX:
        raise CodingError(f"rANS: alphabet size must be in [2, {NSYM_MAX}], got {a.size}")
    f = a.astype(np.int64)
    if int(f.min()) < 0:
        raise CodingError("rANS: frequencies must be non-negative")
    total = int(f.sum())
    pb = total.bit_length() - 1
    if total != 1 << pb or not MIN_PROB_BITS <= pb <= MAX_PROB_BITS:
        raise CodingError(f"rANS: frequencies must sum to 2^b with b in [{MIN_PROB_BITS}, {MAX_PROB_BITS}], got {total}")
    if int(f.max()) == total:
        raise CodingError("rANS: a frequency equals the total (at least two symbols must be possible)")
    return f, pb



# ----------------------------------------------------------------------------- table serialization

_DELTA = 0x80


def _zigzag(d: np.ndarray) -> np.ndarray:
    return (d << 1) ^ (d >> 63)


def pack_freqs(freqs: np.ndarray) -> bytes:
    """A compact serialization of a frequency table: one mode byte, then Exp-Golomb codes.

    Mode byte: bit 7 set = the zigzagged differences of consecutive frequencies are coded,
    clear = the frequencies themselves; bits 0-4 = the Exp-Golomb order k. The smaller of the
    two codings (each at its best order) is written. ``len(freqs)`` and ``prob_bits`` are not
    stored: the reader passes them (the file header holds them).
    """
    f, _ = check_freqs(freqs)
    d = _zigzag(np.diff(f, prepend=0))
    best = None
    for mode, vals in ((0, f), (_DELTA, d)):
        for k in range(0, 16):
            nb = 2 * (np.frexp((vals + (1 << k)).astype(np.float64))[1].astype(np.int64)) - 1 - k
            bits = int(nb.sum())
            if best is None or bits < best[0]:
                best = (bits, mode, k, vals)
    _, mode, k, vals = best
    body = _eg_encode(np.ascontiguousarray(vals.astype(np.int64)), k, False).tobytes()
    return bytes([mode | k]) + body


def unpack_freqs(data: bytes | bytearray | memoryview, nsym: int, prob_bits: int) -> tuple[np.ndarray, int]:
    """Read a table written by :func:`pack_freqs` from the start of ``data``; returns (freqs uint32, bytes used).

    Raises :class:`CodingError` unless the table is valid for the coder (``nsym`` entries summing to
    ``1 << prob_bits``, not all mass on one symbol).
    """
    pb = _check_prob_bits(prob_bits)
    if not isinstance(nsym, (int, np.integer)) or not 2 <= int(nsym) <= NSYM_MAX:
        raise CodingError(f"rANS: alphabet size must be in [2, {NSYM_MAX}], got {nsym!r}")
    nsym = int(nsym)
    if len(data) < 1:
        raise CodingError("rANS: empty frequency table")
    head = data[0]
    mode, k = head & 0xE0, head & 0x1F
    if mode not in (0, _DELTA) or k > 15:
        raise CodingError(f"rANS: bad frequency table mode byte {head:#x}")
    body = memoryview(bytes(data[1:]))
    # every code takes at least k + 1 bits: bound nsym by the data before decoding
    nbits = 8 * len(body)
    if nsym * (k + 1) > nbits:
        raise CodingError(f"rANS: {nsym} frequencies cannot fit in {len(body)} bytes")
    vals, status, pos = _eg_decode(padded(body), nbits, nsym, k, False)
    if status:
        raise CodingError("rANS: damaged frequency table")
    if mode == _DELTA:
        d = (vals >> 1) ^ -(vals & 1)
        f = np.cumsum(d)
    else:
        f = vals
    if f.size and (int(f.min()) < 0 or int(f.max()) > 1 << pb):
        raise CodingError("rANS: frequency table entries out of range")
    if int(f.sum()) != 1 << pb:
        raise CodingError(f"rANS: frequency table sums to {int(f.sum())}, expected 2^{pb}")
    check_freqs(f)
    return f.astype(np.uint32), 1 + ((pos + 7) >> 3)
