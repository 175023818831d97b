"""Bit packing shared by the prefix coders (numba kernels, MSB-first bit order).

A stream is a sequence of codewords written most significant bit first; the last byte is
padded with zero bits. Writers keep a 64-bit accumulator and store 32 bits at a time
(:func:`put_bits`, :func:`flush_bits`); readers refill a 64-bit accumulator 32 bits at a time
(:func:`refill`), so at least 32 bits can be peeked after every refill, or read a 64-bit window
at any bit position (:func:`load_window`). Readers work on a copy
of the stream followed by ``PAD`` zero bytes, so a refill up to 8 bytes past the end of the
stream never reads outside the buffer; every decoder checks the bit position against the
true stream length and returns an error code instead of reading garbage, so damaged input
can never crash or hang.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import leading_zeros

PAD = 16
MAX_CODE_BITS = 63

U8 = np.uint64(8)
U16 = np.uint64(16)
U24 = np.uint64(24)
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
    (Exp-Golomb reads each codeword from one window: faster there than :func:`refill`.)
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


@njit(cache=True, inline="always")
def put_bits(out: np.ndarray, p: int, acc: np.uint64, nacc: int, code: np.uint64, length: int):
    """Append the low ``length`` (0..32) bits of ``code`` (no higher bits set); returns (p, acc, nacc).

    ``nacc`` (< 32 between calls) bits are pending in ``acc``; full 32-bit words go to ``out[p:]``.
    """
    acc = (acc << np.uint64(length)) | code
    nacc += length
    if nacc >= 32:
        nacc -= 32
        w = acc >> np.uint64(nacc)
        out[p] = np.uint8((w >> U24) & MASK8)
        out[p + 1] = np.uint8((w >> U16) & MASK8)
        out[p + 2] = np.uint8((w >> U8) & MASK8)
        out[p + 3] = np.uint8(w & MASK8)
        p += 4
    return p, acc, nacc


@njit(cache=True, inline="always")
def flush_bits(out: np.ndarray, p: int, acc: np.uint64, nacc: int) -> int:
    """Write the ``nacc`` (< 32) pending bits, zero-padded to whole bytes; returns the end position."""
    w = acc << np.uint64(32 - nacc)
    for i in range((nacc + 7) >> 3):
        out[p + i] = np.uint8((w >> np.uint64(24 - 8 * i)) & MASK8)
    return p + ((nacc + 7) >> 3)


@njit(cache=True, inline="always")
def refill(buf: np.ndarray, p: int, acc: np.uint64, nacc: int):
    """Make at least 32 bits available: if fewer, append the 32 bits at byte ``p``; returns (p, acc, nacc)."""
    if nacc < 32:
        w = ((np.uint64(buf[p]) << U24) | (np.uint64(buf[p + 1]) << U16)
             | (np.uint64(buf[p + 2]) << U8) | np.uint64(buf[p + 3]))
        acc = (acc << U32) | w
        nacc += 32
        p += 4
    return p, acc, nacc


@njit(cache=True, inline="always")
def peek(acc: np.uint64, nacc: int, length: int) -> np.uint64:
    """The next ``length`` (1..32, <= nacc) bits of a reader's accumulator."""
    return (acc >> np.uint64(nacc - length)) & ((np.uint64(1) << np.uint64(length)) - np.uint64(1))


@njit(cache=True)
def pack_fixed(values: np.ndarray, width: int, offset: int = 0) -> np.ndarray:
    """Write ``values[i] - offset`` (integers, must lie in [0, 2^width)) in ``width`` (1..32) bits MSB-first."""
    n = values.shape[0]
    nbytes = (n * width + 7) >> 3
    out = np.zeros(nbytes + PAD, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(n):
        p, acc, nacc = put_bits(out, p, acc, nacc, np.uint64(np.int64(values[i]) - offset), width)
    flush_bits(out, p, acc, nacc)
    return out[:nbytes]


@njit(cache=True)
def unpack_fixed(buf: np.ndarray, n: int, width: int, offset: int = 0) -> np.ndarray:
    """Read ``n`` values of ``width`` (1..32) bits from a padded buffer holding at least ``n * width`` bits;
    returns int64 values plus ``offset``."""
    out = np.empty(n, dtype=np.int64)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(n):
        p, acc, nacc = refill(buf, p, acc, nacc)
        out[i] = np.int64(peek(acc, nacc, width)) + offset
        nacc -= width
    return out


def padded(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A uint8 copy of ``data`` followed by ``PAD`` zero bytes (the readers' input)."""
    src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = np.zeros(src.size + PAD, dtype=np.uint8)
    buf[: src.size] = src
    return buf


def check_decoded(coder: str, status: int, pos: int, nbytes: int, n: int, *, where: str = "",
                  invalid: str = "") -> None:
    """Raise :class:`CodingError` for a prefix decoder's status (1: truncated, 2: invalid codeword at
    bit ``pos``) or for bytes left after ``n`` values (``where`` names the part of the stream)."""
    if status == 1:
        raise CodingError(f"{coder}: stream truncated ({nbytes} {where}bytes hold fewer than {n} values)")
    if status == 2:
        raise CodingError(f"{coder}: invalid codeword at {where}bit {pos}{invalid}")
    if (pos + 7) >> 3 != nbytes:
        raise CodingError(f"{coder}: {nbytes - ((pos + 7) >> 3)} trailing bytes after {n} values")


def zigzag(q: np.ndarray) -> np.ndarray:
    """Map signed integers to non-negative ones: 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ... (uint64)."""
    q = np.asarray(q).astype(np.int64, copy=False)
    return ((q << 1) ^ (q >> 63)).astype(np.uint64)


def unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag` (int64)."""
    z = np.asarray(z).astype(np.uint64, copy=False)
    return ((z >> np.uint64(1)).astype(np.int64)) ^ -((z & np.uint64(1)).astype(np.int64))


def sign_magnitude(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split signed integers into (magnitude as uint64, sign bit as uint8; 1 = negative)."""
    q = np.asarray(q).astype(np.int64, copy=False)
    return np.abs(q).astype(np.uint64), (q < 0).astype(np.uint8)


def from_sign_magnitude(mag: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sign_magnitude` (int64)."""
    m = np.asarray(mag).astype(np.int64)
    return np.where(np.asarray(sign).astype(bool), -m, m)
