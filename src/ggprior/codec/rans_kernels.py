"""The rANS coder's numba kernels (see :mod:`.rans` for the coder, its stream layout and checks).

Every state lies in ``[RANS_L, RANS_L << 16)``; the stream starts with ``LANES`` uint32 final
encoder states (``HEADER_BYTES``), then the uint16 words in decoding order. The kernels take a
table already validated by :func:`.rans_tables.check_freqs` and report problems as status codes;
:func:`.rans.encode` / :func:`.rans.decode` turn them into :class:`CodingError`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

LANES = 4
STATE_BITS = 16  # L = 2^16: states in [2^16, 2^32)
RANS_L = 1 << STATE_BITS
HEADER_BYTES = 4 * LANES


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
