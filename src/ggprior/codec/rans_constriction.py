"""Entropy coder with integer frequency tables, on ``constriction``'s rANS (stand-in for ``codec/rans.py``).

Same signatures as the fast numba rANS of ``codec/rans.py`` (``quantize_freqs``, ``encode``,
``decode``, ``pack_freqs``, ``unpack_freqs``); :mod:`.lossless` uses that module when it is
present and this one otherwise. The model is an integer table ``freqs`` (uint32, summing to
``2**prob_bits``): symbols of frequency 0 must not occur. ``constriction`` takes the table as
probabilities ``freqs / 2**prob_bits`` (``perfect=False``, deterministic), so both ends derive the
same coder model from the same integers.

An ANS coder starting from its empty state codes runs of the symbol whose cumulative
frequency starts at 0 for free; the encoder therefore codes one sentinel symbol (the last
one of nonzero frequency, whose cumulative frequency is above 0) first, and the decoder checks it and that no data is left over. ``decode``
bounds ``n`` by the stream length before allocating: every symbol costs at least
``-log2(max freq / total)`` bits, and ``quantize_freqs`` keeps ``max freq`` below the total.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from ..coding import expgolomb
from ..coding.bits import CodingError

PROB_BITS_MAX = 24
NSYM_MAX = 1 << 16


def quantize_freqs(counts_or_probs: np.ndarray, prob_bits: int = 16) -> np.ndarray:
    """Integer frequencies summing to ``2**prob_bits``: every nonzero entry gets >= 1, zeros stay 0.

    Deterministic (the decoder recomputes a GG model's table with it). At least two entries
    are nonzero afterwards (a lone symbol gets a neighbour of frequency 1), so no symbol has
    probability 1 and every coded symbol costs a positive number of bits.
    """
    p = np.asarray(counts_or_probs, dtype=np.float64).reshape(-1)
    if not 1 <= prob_bits <= PROB_BITS_MAX:
        raise CodingError(f"prob_bits must be in [1, {PROB_BITS_MAX}], got {prob_bits}")
    if p.size < 2 or p.size > NSYM_MAX or not np.all(np.isfinite(p)) or np.any(p < 0):
        raise CodingError(f"frequency model needs 2..{NSYM_MAX} finite nonnegative entries, got {p.size}")
    total = 1 << prob_bits
    p = p.copy()
    nz = p > 0
    if nz.sum() == 0:
        p[:] = 1.0
        nz[:] = True
    if nz.sum() == 1:
        j = int(np.flatnonzero(nz)[0])
        p[j - 1 if j > 0 else 1] = p[j] * 1e-12
        nz = p > 0
    m = int(nz.sum())
    if m > total:
        raise CodingError(f"{m} symbols do not fit a table of total 2^{prob_bits}")
    f = np.zeros(p.size, dtype=np.int64)
    f[nz] = 1 + np.floor(p[nz] / p[nz].sum() * (total - m)).astype(np.int64)
    f[int(np.argmax(f))] += total - int(f.sum())
    if f.max() >= total:  # only possible for m == 2 at tiny prob_bits
        j = int(np.argmax(f))
        f[j] -= 1
        f[int(np.flatnonzero(nz & (np.arange(p.size) != j))[0])] += 1
    return f.astype(np.uint32)


def _check(freqs: np.ndarray) -> tuple[np.ndarray, int]:
    f = np.asarray(freqs)
    if f.ndim != 1 or not 2 <= f.size <= NSYM_MAX or f.dtype.kind not in "iu":
        raise CodingError("frequency table must be a 1-D integer array of 2..65536 entries")
    total = int(f.sum())
    prob_bits = total.bit_length() - 1
    if total != 1 << prob_bits or prob_bits > PROB_BITS_MAX or int(f.max()) >= total:
        raise CodingError(f"frequencies must sum to a power of two <= 2^{PROB_BITS_MAX} with max < total")
    return f.astype(np.float64) / total, prob_bits


def _model(p: np.ndarray):
    return constriction.stream.model.Categorical(p, perfect=False)


def _sentinel(p: np.ndarray) -> int:
    return int(np.flatnonzero(p)[-1])


def encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """rANS stream (little-endian 32-bit words) of ``symbols`` under ``freqs``."""
    p, _ = _check(freqs)
    s = np.asarray(symbols).reshape(-1)
    if s.size == 0:
        return b""
    if s.min() < 0 or s.max() >= p.size or np.any(np.asarray(freqs)[s] == 0):
        raise CodingError("a symbol lies outside the table or has frequency 0")
    msg = np.empty(s.size + 1, dtype=np.int32)
    msg[:-1] = s
    msg[-1] = _sentinel(p)  # coded first
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(msg, _model(p))
    return coder.get_compressed().astype("<u4").tobytes()


def max_symbols(nbytes: int, freqs: np.ndarray) -> int:
    """The most symbols a stream of ``nbytes`` can hold under ``freqs``."""
    p, prob_bits = _check(freqs)
    # constriction requantizes to 24 bits: max p may grow by up to 2^-24 per symbol of the alphabet
    pmax = min(float(p.max()) + p.size * 2.0**-24, 1.0 - 2.0**-25)
    return int(1.05 * (8 * nbytes + 64) / -math.log2(pmax)) + 2


def decode(data: bytes | memoryview, freqs: np.ndarray, n: int) -> np.ndarray:
    """Decode ``n`` symbols (uint16 when the alphabet fits, else int32); raises CodingError on bad data."""
    p, _ = _check(freqs)
    if n == 0:
        if len(data):
            raise CodingError(f"rANS: {len(data)} bytes of data for 0 symbols")
        return np.zeros(0, dtype=np.uint16)
    if len(data) % 4 or len(data) == 0:
        raise CodingError(f"rANS: stream length {len(data)} is not a positive multiple of 4 bytes")
    if n > max_symbols(len(data), freqs):
        raise CodingError(f"rANS: {n} symbols cannot be coded in {len(data)} bytes")
    words = np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_model(p), int(n) + 1)
    except (ValueError, RuntimeError, OverflowError) as e:
        raise CodingError(f"rANS: invalid stream ({e})") from e
    if out[-1] != _sentinel(p) or not coder.is_empty():
        raise CodingError("rANS: stream does not end where expected (damaged data)")
    out = out[:-1]
    if np.any(np.asarray(freqs)[out] == 0):
        raise CodingError("rANS: decoded a symbol of frequency 0 (damaged data)")
    return out.astype(np.uint16 if p.size <= 1 << 16 else np.int32)


def pack_freqs(freqs: np.ndarray) -> bytes:
    """Self-delimiting table: u16 first index, u16 count, u8 EG order, u32 byte length, EG-coded entries."""
    f = np.asarray(freqs, dtype=np.int64)
    nz = np.flatnonzero(f)
    lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, 0)
    dense = f[lo : hi + 1]
    k, _ = expgolomb.best_order(dense, np.ones(dense.size, dtype=np.int64), signed=False, k_max=20)
    body = expgolomb.encode(dense, k, signed=False)
    head = np.array([lo, dense.size], dtype="<u2").tobytes() + bytes([k]) + np.uint32(len(body)).astype("<u4").tobytes()
    return head + body


def unpack_freqs(data: bytes | memoryview, nsym: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`pack_freqs` for an alphabet of ``nsym`` symbols; returns (freqs, bytes used)."""
    mv = memoryview(bytes(data)) if not isinstance(data, memoryview) else data
    if len(mv) < 9:
        raise CodingError("frequency table truncated")
    lo, cnt = (int(v) for v in np.frombuffer(mv[:4], dtype="<u2"))
    k = mv[4]
    blen = int(np.frombuffer(mv[5:9], dtype="<u4")[0])
    if cnt < 1 or lo + cnt > nsym or k > 20 or 9 + blen > len(mv):
        raise CodingError("frequency table header out of range")
    dense = expgolomb.decode(mv[9 : 9 + blen], cnt, k, signed=False)
    if np.any(dense >= 1 << PROB_BITS_MAX):
        raise CodingError("frequency table entry out of range")
    f = np.zeros(nsym, dtype=np.uint32)
    f[lo : lo + cnt] = dense
    _check(f)
    return f, 9 + blen
