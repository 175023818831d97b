"""Fixed-length (FL) code: every integer as ``q - qmin`` in ``width`` bits, MSB-first.

``width`` is the smallest number of bits covering ``qmax - qmin`` (at least 1, at most 32);
the side information is ``qmin`` and ``width``. With ``quant.step_for_bits(t, bits)`` the
range has at most ``2^bits - 1`` levels, so ``width <= bits``.
"""

from __future__ import annotations

import numpy as np

from .bits import CodingError, pack_fixed, padded, unpack_fixed

WIDTH_MAX = 32


def width_for(qmin: int, qmax: int) -> int:
    """Bits needed for the range [qmin, qmax] (at least 1)."""
    if qmax < qmin:
        raise CodingError(f"FL: empty range [{qmin}, {qmax}]")
    return max(1, int(qmax - qmin).bit_length())


def encode(q: np.ndarray, width: int | None = None) -> tuple[bytes, dict]:
    """FL-code an integer array; returns (stream, params) with params ``{"qmin", "width"}``."""
    a = np.asarray(q).reshape(-1)
    if a.dtype.kind not in "iu":
        raise CodingError(f"FL: expected integers, got dtype {a.dtype}")
    qmin, qmax = (int(a.min()), int(a.max())) if a.size else (0, 0)
    need = width_for(qmin, qmax)
    width = need if width is None else int(width)
    if not need <= width <= WIDTH_MAX:
        raise CodingError(f"FL: width {width} cannot hold the range [{qmin}, {qmax}] (needs {need}..{WIDTH_MAX})")
    return pack_fixed(np.ascontiguousarray(a), width, qmin).tobytes(), {"qmin": qmin, "width": width}


def decode(data: bytes | bytearray | memoryview, n: int, qmin: int, width: int) -> np.ndarray:
    """Decode ``n`` integers (int64) written by :func:`encode`; the stream length must match exactly."""
    if not isinstance(width, (int, np.integer)) or not 1 <= int(width) <= WIDTH_MAX:
        raise CodingError(f"FL: width must be an integer in [1, {WIDTH_MAX}], got {width!r}")
    if not isinstance(qmin, (int, np.integer)) or abs(int(qmin)) >= 1 << 62:
        raise CodingError(f"FL: qmin must be an integer of moderate size, got {qmin!r}")
    if n < 0:
        raise CodingError(f"FL: negative count {n}")
    need = (n * int(width) + 7) >> 3
    if len(data) != need:
        raise CodingError(f"FL: {n} values of {width} bits need {need} bytes, stream has {len(data)}")
    return unpack_fixed(padded(data), int(n), int(width), int(qmin))
