"""A fast table-driven rANS coder (numba): 4 interleaved 32-bit states, 16-bit renormalization.

The model is an integer frequency table ``freqs`` (uint32) over the alphabet ``0 .. len - 1``
whose entries sum to ``1 << prob_bits`` (``MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS``).
:func:`quantize_freqs` makes one from counts or probabilities, integer-exactly;
:func:`pack_freqs` / :func:`unpack_freqs` store it compactly, so a file can carry its own
table and never recompute a float model at read time.

Coder (after Duda's rANS and Giesen's ``rans_byte``/interleaved variants): every state lies
in ``[L, L << 16)`` with ``L = 2^16`` (32 bits); the encoder divides by a frequency with an
exact float64 reciprocal multiply, the decoder looks the symbol up in a table of ``2^prob_bits``
slots. Symbol ``i`` is coded by state ``i % LANES``;
the encoder runs backwards and writes 16-bit words from the end of its buffer, the decoder
runs forwards. Every state starts (encoder) and must end (decoder) at ``L``: no sentinel is
needed, and the final-state check catches most damage.

Stream layout (little-endian): ``LANES`` uint32 final encoder states, then the uint16 words
in decoding order. An empty message (n = 0) is the empty stream.

The decoder validates everything before allocating: the table (sum, at least two nonzero
entries, no entry equal to the total), ``n`` against the stream length (each symbol costs at
least ``-log2(max freq / total)`` bits, see :func:`max_symbols`), the stored states; while
decoding it checks every word read against the end of the stream. Damaged data raises
:class:`CodingError`; it can never read outside its buffer, crash or hang (the loop runs
exactly ``n`` steps).
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import njit

from .bits import CodingError, padded  # noqa: F401  (CodingError is part of this API)
from .expgolomb import _decode as _eg_decode
from .expgolomb import _encode as _eg_encode

LANES = 4
STATE_BITS = 16  # L = 2^16: states in [2^16, 2^32)
RANS_L = 1 << STATE_BITS
PROB_BITS = 16
MIN_PROB_BITS = 8
MAX_PROB_BITS = 16
NSYM_MAX = 1 << 20
HEADER_BYTES = 4 * LANES
_BIG_ENDIAN = sys.byteorder != "little"
BOUND_MARGIN = 2.0  # the bomb bound allows twice the ideal symbol count (see max_symbols)


# ----------------------------------------------------------------------------- frequency tables


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


def max_symbols(nbytes: int, freqs: np.ndarray) -> int:
    """The most symbols that a stream of ``nbytes`` can hold under ``freqs`` (the decoder's bound).

    Each symbol costs at least ``-log2(max freq / total)`` bits. Of the stream's bits, the
    ``LANES`` initial states (``STATE_BITS`` each, still present in the final states) carry no
    symbol information; ``BOUND_MARGIN`` allows for the coder's rounding (its real cost is
    within a fraction of a percent of the ideal one on long messages).
    """
    f, pb = check_freqs(freqs)
    bits_min = pb - math.log2(int(f.max()))
    info = max(0, 8 * nbytes - LANES * STATE_BITS)
    return int(BOUND_MARGIN * info / bits_min) + LANES


# ----------------------------------------------------------------------------- coder kernels


@njit(cache=True, nogil=True)
def _enc_tables(f: np.ndarray, pb: int):
    """Per-symbol encoder constants: int rows (x_max, start, freq), float rows (1 / freq, 0.5 / freq).

    The encoder divides ``x < 2^32`` by ``f < 2^16`` as ``floor(x * (1/f) + 0.5/f)``: the true
    quotient's fractional part is 0 or in ``[1/f, 1 - 1/f]``, and the float64 error (below
    ``2^32 * 2^-51 = 2^-19``) is less than ``0.5/f >= 2^-17``, so the floor is exact.
    Symbols with frequency 0 get ``x_max = -1``: the encoder rejects them.
    """
    n = f.shape[0]
    itab = np.zeros((n, 3), dtype=np.int64)
    ftab = np.zeros((n, 2), dtype=np.float64)
    acc = np.int64(0)
    for s in range(n):
        fs = f[s]
        itab[s, 1] = acc
        itab[s, 2] = fs
        acc += fs
        if fs == 0:
            itab[s, 0] = -1
            continue
        itab[s, 0] = ((np.int64(RANS_L) >> pb) << 16) * fs
        ftab[s, 0] = 1.0 / fs
        ftab[s, 1] = 0.5 / fs
    return itab, ftab


@njit(cache=True, inline="always")
def _enc_put(x, s, itab, ftab, pb, words, p):
    # branch-free renormalization: the word is always stored, kept only when the state is too big
    big = np.int64(x >= itab[s, 0])
    words[p - 1] = np.uint16(x & 0xFFFF)
    p -= big
    x >>= 16 * big
    q = np.int64(x * ftab[s, 0] + ftab[s, 1])
    return (q << pb) + x - q * itab[s, 2] + itab[s, 1], p


@njit(cache=True, nogil=True)
def _encode_kernel(sym: np.ndarray, f: np.ndarray, pb: int, out: np.ndarray):
    """(status, bytes): status 0 ok, else 1 + the index of the first symbol with frequency 0 / out of range.

    ``out``: a NumPy buffer of ``HEADER_BYTES + 2 n`` bytes (the result is a view of its tail).
    """
    n = sym.shape[0]
    nsym = f.shape[0]
    itab, ftab = _enc_tables(f, pb)
    for i in range(n):
        s = np.int64(sym[i])
        if s < 0 or s >= nsym or itab[s, 0] < 0:
            return 1 + i, np.zeros(0, dtype=np.uint8)
    # words are written backwards from the end, after room for the header: the result is a view
    words = out[HEADER_BYTES:].view(np.uint16)  # native order; fixed below if big-endian
    p = n
    x0 = np.int64(RANS_L)
    x1 = np.int64(RANS_L)
    x2 = np.int64(RANS_L)
    x3 = np.int64(RANS_L)
    i = n - 1
    # the tail (n % 4 symbols) first, then full groups of four, all backwards
    while i >= 0 and (i & 3) != 3:
        s = np.int64(sym[i])
        lane = i & 3
        if lane == 0:
            x0, p = _enc_put(x0, s, itab, ftab, pb, words, p)
        elif lane == 1:
            x1, p = _enc_put(x1, s, itab, ftab, pb, words, p)
        else:
            x2, p = _enc_put(x2, s, itab, ftab, pb, words, p)
        i -= 1
    while i >= 3:
        x3, p = _enc_put(x3, np.int64(sym[i]), itab, ftab, pb, words, p)
        x2, p = _enc_put(x2, np.int64(sym[i - 1]), itab, ftab, pb, words, p)
        x1, p = _enc_put(x1, np.int64(sym[i - 2]), itab, ftab, pb, words, p)
        x0, p = _enc_put(x0, np.int64(sym[i - 3]), itab, ftab, pb, words, p)
        i -= 4
    # the header goes right before the first word
    k = HEADER_BYTES + 2 * p - HEADER_BYTES
    j = k
    for x in (x0, x1, x2, x3):
        for b in range(4):
            out[j] = np.uint8((x >> (8 * b)) & 0xFF)
            j += 1
    return 0, out[k:]


@njit(cache=True, nogil=True)
def _dec_tables(f: np.ndarray, pb: int, slot_sym: np.ndarray) -> np.ndarray:
    """Fill ``slot_sym`` (the symbol of each of the ``2^pb`` slots); returns freq << 32 | start per symbol."""
    sym_tab = np.empty(f.shape[0], dtype=np.int64)
    acc = 0
    for s in range(f.shape[0]):
        sym_tab[s] = (f[s] << 32) | acc
        for j in range(acc, acc + f[s]):
            slot_sym[j] = s
        acc += f[s]
    return sym_tab


@njit(cache=True, inline="always")
def _dec_step(x, slot_sym, sym_tab, mask, pb, buf, p, last):
    # branch-free renormalization; reads are clamped into the buffer (``last`` = its last word's
    # offset) and the caller checks afterwards that no read went past the end
    slot = x & mask
    s = np.int64(slot_sym[slot])
    e = sym_tab[s]
    x = (e >> 32) * (x >> pb) + slot - (e & 0xFFFFFFFF)
    need = np.int64(x < RANS_L)
    r = min(p, last)
    w = np.int64(buf[r]) | (np.int64(buf[r + 1]) << 8)
    x = (x << (16 * need)) | (w & -need)
    return x, np.int32(s), p + 2 * need


@njit(cache=True, nogil=True)
def _decode_kernel(buf: np.ndarray, end: int, n: int, f: np.ndarray, pb: int, slot_sym: np.ndarray,
                   out: np.ndarray):
    """(values, status): status 0 ok, 1 truncated, 2 bad initial state, 3 bad final state, 4 data left over.

    ``out`` (int32, n) comes from NumPy: its large allocations use transparent huge pages, and
    first-touch page faults on a numba allocation cost as much as the decoding.
    """
    lim = np.int64(RANS_L) << 16
    xs = np.empty(LANES, dtype=np.int64)
    for lane in range(LANES):
        v = np.int64(0)
        for b in range(4):
            v |= np.int64(buf[4 * lane + b]) << (8 * b)
        if v < RANS_L or v >= lim:
            return out, 2
        xs[lane] = v
    x0, x1, x2, x3 = xs[0], xs[1], xs[2], xs[3]
    sym_tab = _dec_tables(f, pb, slot_sym)
    mask = (np.int64(1) << pb) - 1
    p = HEADER_BYTES
    last = max(end - 2, 0)
    i = 0
    while i + 4 <= n:
        x0, s0, p = _dec_step(x0, slot_sym, sym_tab, mask, pb, buf, p, last)
        x1, s1, p = _dec_step(x1, slot_sym, sym_tab, mask, pb, buf, p, last)
        x2, s2, p = _dec_step(x2, slot_sym, sym_tab, mask, pb, buf, p, last)
        x3, s3, p = _dec_step(x3, slot_sym, sym_tab, mask, pb, buf, p, last)
        out[i] = s0
        out[i + 1] = s1
        out[i + 2] = s2
        out[i + 3] = s3
        i += 4
    xs[0], xs[1], xs[2], xs[3] = x0, x1, x2, x3
    while i < n:
        lane = i & 3
        xl, s, p = _dec_step(xs[lane], slot_sym, sym_tab, mask, pb, buf, p, last)
        xs[lane] = xl
        out[i] = s
        i += 1
    if p > end:
        return out, 1
    for lane in range(LANES):
        if xs[lane] != RANS_L:
            return out, 3
    if p != end:
        return out, 4
    return out, 0


# ----------------------------------------------------------------------------- public API


def encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """rANS stream of ``symbols`` (integers in ``[0, len(freqs))``, each with a nonzero frequency)."""
    f, pb = check_freqs(freqs)
    a = np.asarray(symbols).reshape(-1)
    if a.dtype.kind not in "iu":
        raise CodingError(f"rANS: symbols must be integers, got dtype {a.dtype}")
    if a.size == 0:
        return b""
    if a.dtype.kind == "u" and a.dtype.itemsize >= 8:
        if int(a.max()) >= f.size:
            raise CodingError(f"rANS: symbol {int(a.max())} outside the alphabet [0, {f.size})")
        a = a.astype(np.int64)
    status, out = _encode_kernel(np.ascontiguousarray(a), f, pb, np.empty(HEADER_BYTES + 2 * a.size, dtype=np.uint8))
    if status:
        i = status - 1
        raise CodingError(f"rANS: symbol {int(a[i])} at index {i} is outside the alphabet [0, {f.size}) "
                          "or has frequency 0")
    if _BIG_ENDIAN:  # the kernel writes the words in native order
        w = out[HEADER_BYTES:].view(np.uint16)
        w.byteswap(inplace=True)
    return out.tobytes()


def decode(data: bytes | bytearray | memoryview, freqs: np.ndarray, n: int) -> np.ndarray:
    """Decode ``n`` symbols (int32) from a stream written by :func:`encode` with the same ``freqs``."""
    f, pb = check_freqs(freqs)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise CodingError(f"rANS: n must be a non-negative integer, got {n!r}")
    n = int(n)
    nbytes = len(data)
    if n == 0:
        if nbytes:
            raise CodingError(f"rANS: {nbytes} bytes of data for 0 symbols")
        return np.zeros(0, dtype=np.int32)
    if nbytes < HEADER_BYTES or (nbytes - HEADER_BYTES) % 2:
        raise CodingError(f"rANS: a stream of {nbytes} bytes is not {HEADER_BYTES} bytes of states plus 16-bit words")
    if n > max_symbols(nbytes, f):
        raise CodingError(f"rANS: {n} symbols cannot be coded in {nbytes} bytes under this table")
    buf = np.frombuffer(data, dtype=np.uint8)
    slot_sym = np.empty(1 << pb, dtype=np.uint16 if f.size <= 1 << 16 else np.int32)
    out, status = _decode_kernel(buf, nbytes, n, f, pb, slot_sym, np.empty(n, dtype=np.int32))
    if status == 1:
        raise CodingError(f"rANS: stream truncated ({nbytes} bytes hold fewer than {n} symbols)")
    if status == 2:
        raise CodingError("rANS: invalid initial coder state (damaged stream)")
    if status == 3:
        raise CodingError("rANS: the coder does not end in its initial state (damaged stream or wrong table)")
    if status == 4:
        raise CodingError("rANS: data left over after the last symbol (damaged stream or wrong n)")
    return out


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
