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

Modules: this one (the public API, re-exporting the table functions and constants), the
frequency tables (:mod:`.rans_tables`: quantization, checks, serialization) and the numba
coder kernels (:mod:`.rans_kernels`).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .bits import CodingError  # noqa: F401  (CodingError is part of this API)
from .rans_kernels import HEADER_BYTES, LANES, RANS_L, STATE_BITS, _decode_kernel, _encode_kernel  # noqa: F401
from .rans_tables import (  # noqa: F401  (the table functions and constants are part of this API)
    MAX_PROB_BITS,
    MIN_PROB_BITS,
    NSYM_MAX,
    PROB_BITS,
    check_freqs,
    pack_freqs,
    quantize_freqs,
    unpack_freqs,
)

_BIG_ENDIAN = sys.byteorder != "little"
BOUND_MARGIN = 2.0  # the bomb bound allows twice the ideal symbol count (see max_symbols)


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
