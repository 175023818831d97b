"""Bit packing shared by the prefix coders (numba kernels, MSB-first bit order).

A stream is a sequence of codewords written most significant bit first; the last byte is
padded with zero bits. Readers work on a copy of the stream followed by ``PAD`` zero bytes,
so a 64-bit big-endian window starting up to 8 bytes past the end of the stream never reads
outside the buffer; every
decoder checks the bit position against the true stream length and returns an error code
instead of reading garbage, so damaged input can never crash or hang.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import leading_zeros

PAD = 16
MAX_CODE_BITS = 63

U8 = np.uint64(8)
U32 = np.uint64(32)
U64_0 = np.uint64(0)
MASK8 = np.uint64(0xFF)
MASK32 = np.uint64(0xFFFFFFFF)


class CodingError(ValueError):
    """A stream cannot be encoded or decoded (bad parameters, damaged or truncated data)."""


@njit(cache=True, inline="always")
def load_window(buf: np.ndarray, pos: int) -> np.uint64:
    """The 64 bits starting at byte ``pos >> 3`` (big-endian), shifted so bit ``pos`` is the MSB.

    At least 57 of the returned bits are valid; ``buf`` must hold 8 bytes from ``pos >> 3`` on.
    """
    b = pos >> 3
    w = np.uint64(0)
    for i in range(8):
        w = (w << U8) | np.uint64(buf[b + i])
    return w << np.uint64(pos & 7)


@njit(cache=True, inline="always")
def clz64(w: np.uint64) -> int:
    """Number of leading zero bits of a uint64 (64 for 0)."""
    return int(leading_zeros(w))


@njit(cache=True)
def pack_codes(codes: np.ndarray, lengths: np.ndarray, total_bits: int) -> np.ndarray:
    """Write ``lengths[i]`` low bits of ``codes[i]`` (uint64, lengths <= 63) MSB-first; return bytes."""
    nbytes = (total_bits + 7) >> 3
    out = np.zeros(nbytes + PAD, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(codes.shape[0]):
        c = codes[i]
        L = int(lengths[i])
        if L > 32:
            hi = L - 32
            acc = (acc << np.uint64(hi)) | (c >> U32)
            nacc += hi
            while nacc >= 8:
                nacc -= 8
                out[p] = np.uint8((acc >> np.uint64(nacc)) & MASK8)
                p += 1
            c = c & MASK32
            L = 32
        acc = (acc << np.uint64(L)) | c
        nacc += L
        while nacc >= 8:
            nacc -= 8
            out[p] = np.uint8((acc >> np.uint64(nacc)) & MASK8)
            p += 1
    if nacc > 0:
        out[p] = np.uint8((acc << np.uint64(8 - nacc)) & MASK8)
    return out[:nbytes]


@njit(cache=True)
def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Write the low ``width`` (1..32) bits of each uint64 value MSB-first; return bytes."""
    n = values.shape[0]
    total = n * width
    nbytes = (total + 7) >> 3
    out = np.zeros(nbytes + PAD, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    uw = np.uint64(width)
    for i in range(n):
        acc = (acc << uw) | values[i]
        nacc += width
        while nacc >= 8:
            nacc -= 8
            out[p] = np.uint8((acc >> np.uint64(nacc)) & MASK8)
            p += 1
    if nacc > 0:
        out[p] = np.uint8((acc << np.uint64(8 - nacc)) & MASK8)
    return out[:nbytes]


@njit(cache=True)
def unpack_fixed(buf: np.ndarray, nbits: int, n: int, width: int) -> np.ndarray:
    """Read ``n`` values of ``width`` (1..32) bits from a padded buffer holding ``nbits`` valid bits."""
    out = np.empty(n, dtype=np.uint64)
    shift = np.uint64(64 - width)
    pos = 0
    for i in range(n):
        out[i] = load_window(buf, pos) >> shift
        pos += width
    return out


def padded(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A uint8 copy of ``data`` followed by ``PAD`` zero bytes (the readers' input)."""
    src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = np.zeros(src.size + PAD, dtype=np.uint8)
    buf[: src.size] = src
    return buf


def as_uint64(values: np.ndarray, what: str) -> np.ndarray:
    """Validate non-negative integer input and return it as a contiguous uint64 array."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        raise CodingError(f"{what}: expected integers, got dtype {a.dtype}")
    a = a.reshape(-1)
    if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
        raise CodingError(f"{what}: expected non-negative integers, got {int(a.min())}")
    return np.ascontiguousarray(a, dtype=np.uint64)
