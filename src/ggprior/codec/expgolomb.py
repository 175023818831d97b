"""Exp-Golomb codes of order k: exact lengths, and a vectorized (numba) encoder and decoder.

A non-negative integer n is coded at order k as v = n + 2^k written in binary (L = bit length
of v) after L - 1 - k zero bits, so its length is 2 floor(log2(n / 2^k + 1)) + 1 + k bits
(SPEC.md section 4). Signed integers are first mapped with zigzag (0, -1, 1, -2, ... ->
0, 1, 2, 3, ...; ``signed=True``). Values must satisfy n + 2^k < 2^32 (k <= 31).

Streams are MSB-first and carry no header: the decoder needs the count ``n`` and ``k``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .bits import PAD, CodingError, check_decoded, clz64, load_window, padded, zigzag

K_MAX = 31
V_LIMIT = 1 << 32


def _values(values: np.ndarray | torch.Tensor, signed: bool) -> np.ndarray:
    """A contiguous 1-D integer array; unsigned input is checked to be non-negative."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        raise CodingError(f"Exp-Golomb: expected integers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a.reshape(-1))
    if a.dtype == np.uint64 or (a.dtype.kind == "u" and signed):
        a = a.astype(np.int64)
    if a.size and not signed and int(a.min()) < 0:
        raise CodingError(f"Exp-Golomb: expected non-negative integers with signed=False, got {int(a.min())}")
    return a


def _max_mapped(a: np.ndarray, signed: bool) -> int:
    if not a.size:
        return 0
    lo, hi = int(a.min()), int(a.max())
    return max(2 * hi, -2 * lo - 1) if signed else hi


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= K_MAX:
        raise CodingError(f"Exp-Golomb: order k must be an integer in [0, {K_MAX}], got {k!r}")
    return int(k)


def lengths(n: np.ndarray, k: int) -> np.ndarray:
    """Code length in bits of each non-negative integer in ``n`` at order ``k`` (int64)."""
    k = _check_k(k)
    v = np.asarray(n, dtype=np.float64) + float(1 << k)
    nb = np.frexp(v)[1].astype(np.int64)  # bit length of v (exact below 2^53)
    return 2 * nb - 1 - k


def total_bits_hist(symbols: np.ndarray, counts: np.ndarray, k: int, *, signed: bool = True) -> int:
    """Total coded bits of a histogram (distinct ``symbols`` with ``counts``) at order ``k``."""
    n = zigzag(symbols) if signed else np.asarray(symbols)
    return int(np.dot(lengths(n, k), np.asarray(counts, dtype=np.int64)))


def bits_per_order(symbols: np.ndarray, counts: np.ndarray, *, signed: bool = True, k_max: int = 24) -> np.ndarray:
    """Total coded bits of a histogram at every order 0..k_max (int64 array of k_max + 1)."""
    n = (zigzag(symbols) if signed else np.asarray(symbols)).astype(np.float64)
    c = np.asarray(counts, dtype=np.int64)
    ks = np.arange(k_max + 1)
    nb = np.frexp(n[None, :] + np.exp2(ks)[:, None])[1].astype(np.int64)
    return (2 * nb - 1 - ks[:, None]) @ c


def best_order(symbols: np.ndarray, counts: np.ndarray, *, signed: bool = True, k_max: int = 24) -> tuple[int, int]:
    """(k, total bits) of the order minimising the coded length of a histogram."""
    bits = bits_per_order(symbols, counts, signed=signed, k_max=k_max)
    k = int(np.argmin(bits))
    return k, int(bits[k])


@njit(cache=True, inline="always")
def _zz(x) -> np.uint64:
    xi = np.int64(x)
    return np.uint64((xi << 1) ^ (xi >> 63))


@njit(cache=True)
def _encode(x: np.ndarray, k: int, signed: bool) -> np.ndarray:
    n = x.shape[0]
    base = np.uint64(1) << np.uint64(k)
    total = 0
    for i in range(n):
        z = _zz(x[i]) if signed else np.uint64(x[i])
        nb = 64 - clz64(z + base)
        total += 2 * nb - 1 - k
    nbytes = (total + 7) >> 3
    out = np.zeros(nbytes + PAD, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(n):
        v = (_zz(x[i]) if signed else np.uint64(x[i])) + base
        nb = 64 - clz64(v)
        zeros = nb - 1 - k
        # zeros then v in nb bits; flush so that the accumulator never exceeds 64 bits.
        acc = acc << np.uint64(zeros)
        nacc += zeros
        while nacc >= 8:
            nacc -= 8
            out[p] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
            p += 1
        acc = (acc << np.uint64(nb)) | v
        nacc += nb
        while nacc >= 8:
            nacc -= 8
            out[p] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
            p += 1
    if nacc > 0:
        out[p] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
    return out[:nbytes]


@njit(cache=True)
def _decode(buf: np.ndarray, nbits: int, n: int, k: int, signed: bool) -> tuple[np.ndarray, int, int]:
    """Decode n values; returns (values, status, bit position). status 0 ok, 1 truncated, 2 bad code."""
    out = np.zeros(n, dtype=np.int64)
    base = np.uint64(1) << np.uint64(k)
    zmax = 31 - k
    pos = 0
    for i in range(n):
        if pos >= nbits:
            return out, 1, pos
        w = load_window(buf, pos)
        z = clz64(w)
        if z > zmax:
            return out, 2, pos
        nb = z + 1 + k
        if 2 * z + 1 + k <= 57:
            v = (w << np.uint64(z)) >> np.uint64(64 - nb)
        else:
            v = load_window(buf, pos + z) >> np.uint64(64 - nb)
        pos += z + nb
        if pos > nbits:
            return out, 1, pos
        z = v - base
        out[i] = (np.int64(z >> np.uint64(1)) ^ -np.int64(z & np.uint64(1))) if signed else np.int64(z)
    return out, 0, pos


@njit(cache=True)
def _decode_fast(buf: np.ndarray, nbits: int, n: int, k: int, signed: bool,
                 out: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Same contract as :func:`_decode` (the reference it is tested against), several codewords per window.

    Decodes into ``out`` (int64, ``n`` values, allocated by NumPy: huge pages, fewer page faults).

    One 64-bit window (57 valid bits) is read and consumed codeword by codeword (count leading
    zeros, shift) until the next codeword does not fit in the bits left; a codeword longer than
    57 bits, or one with too many leading zeros, goes through the reference logic.
    """
    base = np.uint64(1) << np.uint64(k)
    zmax = 31 - k
    pos = 0
    i = 0
    while i < n:
        if pos >= nbits:
            return out, 1, pos
        w = load_window(buf, pos)
        avail = 57
        start = i
        while i < n:
            z = clz64(w)
            L = 2 * z + 1 + k
            if L > avail or z > zmax:
                break
            v = (w << np.uint64(z)) >> np.uint64(64 - (z + 1 + k))
            w <<= np.uint64(L)
            avail -= L
            pos += L
            d = v - base
            out[i] = (np.int64(d >> np.uint64(1)) ^ -np.int64(d & np.uint64(1))) if signed else np.int64(d)
            i += 1
        if i > start or i >= n:
            continue
        # the first codeword of a fresh window did not fit in it (or is invalid)
        z = clz64(w)
        if z > zmax:
            return out, 2, pos
        nb = z + 1 + k
        v = load_window(buf, pos + z) >> np.uint64(64 - nb)
        pos += z + nb
        d = v - base
        out[i] = (np.int64(d >> np.uint64(1)) ^ -np.int64(d & np.uint64(1))) if signed else np.int64(d)
        i += 1
    if pos > nbits:
        return out, 1, pos
    return out, 0, pos


def encode(values: np.ndarray | torch.Tensor, k: int = 0, *, signed: bool = True) -> bytes:
    """Exp-Golomb code of order ``k`` of an integer array (zigzag-mapped when ``signed``) -> bytes."""
    k = _check_k(k)
    a = _values(values, signed)
    top = _max_mapped(a, signed)
    if top + (1 << k) >= V_LIMIT:
        raise CodingError(f"Exp-Golomb: mapped value {top} too large for order {k} (n + 2^k must be < 2^32)")
    return _encode(a, k, signed).tobytes()


def decode(data: bytes | bytearray | memoryview, n: int, k: int = 0, *, signed: bool = True) -> np.ndarray:
    """Decode ``n`` integers (int64) from an Exp-Golomb stream of order ``k``.

    Raises :class:`CodingError` if the stream is truncated, holds an invalid codeword or has
    bytes left over. Every codeword takes at least ``k + 1`` bits, so ``n`` is checked
    against the stream length (``n (k + 1) <= 8 len(data)``) before anything is allocated.
    """
    k = _check_k(k)
    nbits = 8 * len(data)
    if n < 0 or n * (k + 1) > nbits:
        raise CodingError(f"Exp-Golomb: {n} values cannot fit in {len(data)} bytes (at least {k + 1} bits each)")
    out, status, pos = _decode_fast(padded(data), nbits, int(n), k, signed, np.empty(int(n), dtype=np.int64))
    check_decoded("Exp-Golomb", status, pos, len(data), n, invalid=f" (more than {31 - k} leading zeros)")
    return out
