"""Near-entropy coding with rANS (``constriction``'s ``AnsCoder``, 24-bit probabilities).

Two probability models over the alphabet [qmin, qmax] of a tensor's integers:

* ``gg``: the fitted GG bin probabilities (:mod:`.ggmodel`); side information is only
  (mu, beta, gamma) as float32 plus the range (the step is in the file anyway);
* ``hist``: the tensor's own histogram, stored in the stream as Exp-Golomb-coded counts.

Both models are passed to ``constriction.stream.model.Categorical(..., perfect=False)``,
which quantizes them deterministically and gives every symbol of the range a nonzero
probability. Before that the most probable symbol is capped at ``P_MAX`` (1 - 2^-8), so
every symbol costs at least ``-log2(max p) >= -log2(P_MAX)`` bits: this costs nothing
measurable on weights and bounds how many symbols a stream of a given size can claim under
its model, which the decoder checks before allocating (``max_symbols``). The alphabet always
has at least two symbols.

An ANS coder starting from its empty state codes runs of the symbol whose cumulative
probability starts at 0 for free (the state stays 0), so an empty stream would decode to any
number of such symbols. The encoder therefore codes one ``SENTINEL`` symbol (index 1) after
the last value; it is coded first (ANS is last in, first out), lifts the state to at least
the frequency of symbol 0, and from then on every symbol costs its information content. The
decoder checks the sentinel and that no data is left over.

Streams are the coder's 32-bit words, little-endian. The GG model must be recomputed
bit-identically by the decoder (same float32 parameters, same SciPy functions); a stream
checksum over the decoded integers (the container's ``qcrc32``) catches any mismatch.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from . import expgolomb
from .bits import CodingError
from .ggmodel import GGParams, range_probs
from .histogram import Histogram, as_int_array, histogram

P_MAX = 1.0 - 2.0**-8
NSYM_MAX = 1 << 20
OVERHEAD_BITS = 64
SENTINEL = 1  # coded after the last value: see _encode
BOUND_MARGIN = 1.05  # the coder's 24-bit quantization may raise max p slightly above the capped model's


def max_symbols(nbytes: int, p: np.ndarray | None = None) -> int:
    """The most symbols a stream of ``nbytes`` can hold under model ``p`` (default: any model).

    Each symbol costs at least ``-log2(max p)`` bits and the final coder state at most
    ``OVERHEAD_BITS``; ``p`` is capped as the coder does it, ``None`` means ``max p = P_MAX``.
    """
    pmax = P_MAX if p is None else float(capped(p).max())
    return int(BOUND_MARGIN * (8 * nbytes + OVERHEAD_BITS) / -math.log2(pmax)) + 2


def capped(p: np.ndarray) -> np.ndarray:
    """Normalise ``p`` and cap its largest entry at ``P_MAX`` (mass moved evenly to the others)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    j = int(np.argmax(p))
    if p[j] > P_MAX:
        rest = np.arange(p.size) != j
        s = p[rest].sum()
        share = p[rest] / s if s > 0 else np.full(p.size - 1, 1.0 / (p.size - 1))
        p[rest] = (1.0 - P_MAX) * (0.5 * share + 0.5 / (p.size - 1))
        p[j] = P_MAX
    return p


def _alphabet(h: Histogram) -> tuple[int, int]:
    nsym = max(2, h.qmax - h.qmin + 1)
    if nsym > NSYM_MAX:
        raise CodingError(f"ANS: alphabet of {nsym} values exceeds {NSYM_MAX}; use a larger step")
    return h.qmin, nsym


def _model(p: np.ndarray):
    return constriction.stream.model.Categorical(capped(p), perfect=False)


def _encode(values: np.ndarray, qmin: int, p: np.ndarray) -> bytes:
    """rANS words of ``values - qmin`` (symbol indices) followed by the sentinel, as little-endian bytes."""
    if values.size == 0:
        return b""
    msg = np.empty(values.size + 1, dtype=np.int32)
    np.subtract(values, qmin, out=msg[:-1], casting="unsafe")  # indices < NSYM_MAX fit int32
    msg[-1] = SENTINEL
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(msg, _model(p))
    return coder.get_compressed().astype("<u4").tobytes()


def _decode(data: bytes | memoryview, n: int, p: np.ndarray, qmin: int) -> np.ndarray:
    """Decode ``n`` symbol indices and return ``qmin + index`` (int64)."""
    if n == 0:
        if len(data):
            raise CodingError(f"ANS: {len(data)} bytes of data for 0 values")
        return np.zeros(0, dtype=np.int64)
    if len(data) % 4:
        raise CodingError(f"ANS: stream length {len(data)} is not a multiple of 4 bytes")
    if n > max_symbols(len(data), p):
        raise CodingError(f"ANS: {n} values cannot be coded in {len(data)} bytes")
    words = np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_model(p), int(n) + 1)
    except (ValueError, RuntimeError) as e:
        raise CodingError(f"ANS: invalid stream ({e})") from e
    if out[-1] != SENTINEL or not coder.is_empty():
        raise CodingError("ANS: stream does not end where expected (damaged data)")
    q = out[:-1].astype(np.int64)
    q += qmin
    return q


def ideal_bits(hist: Histogram, p: np.ndarray, qmin: int) -> float:
    """Code length in bits of a histogram under the coder's (capped) model ``p`` over [qmin, ...]."""
    if hist.n == 0:
        return 0.0
    pc = capped(p)
    return float(-(hist.counts * np.log2(pc[hist.symbols - qmin])).sum())


def gg_probs(qmin: int, nsym: int, params: GGParams) -> np.ndarray:
    """The GG model over [qmin, qmin + nsym - 1] from float32-rounded parameters (step units)."""
    return range_probs(qmin, qmin + nsym - 1, params.as_float32())


def encode_gg(q: np.ndarray, params: GGParams) -> tuple[bytes, dict]:
    """rANS under the GG model; returns (stream, params ``{"qmin", "nsym"}``). ``params`` in step units."""
    a = as_int_array(q)
    qmin, nsym = _alphabet(histogram(a))
    p = gg_probs(qmin, nsym, params)
    return _encode(a, qmin, p), {"qmin": qmin, "nsym": nsym}


def decode_gg(data: bytes | memoryview, n: int, params: GGParams, qmin: int, nsym: int) -> np.ndarray:
    """Decode ``n`` integers coded by :func:`encode_gg` with the same GG parameters."""
    qmin, nsym = _check_range(qmin, nsym)
    for v in (params.mu, params.beta, params.gamma):
        if not math.isfinite(v):
            raise CodingError(f"ANS: GG parameters must be finite, got {params}")
    if params.beta <= 0 or params.gamma <= 0:
        raise CodingError(f"ANS: GG beta and gamma must be > 0, got {params}")
    return _decode(data, n, gg_probs(qmin, nsym, params), qmin)


def encode_hist(q: np.ndarray) -> tuple[bytes, dict]:
    """rANS under the histogram; returns (stream, params ``{"qmin", "nsym", "k", "table_bytes"}``).

    The stream starts with the dense counts over the range, Exp-Golomb coded (unsigned,
    best order ``k``), then the rANS words.
    """
    a = as_int_array(q)
    h = histogram(a)
    qmin, nsym = _alphabet(h)
    dense = np.zeros(nsym, dtype=np.int64)
    dense[h.symbols - qmin] = h.counts
    k, _ = expgolomb.best_order(dense, np.ones(nsym, dtype=np.int64), signed=False)
    table = expgolomb.encode(dense, k, signed=False)
    payload = _encode(a, qmin, dense.astype(np.float64) if a.size else np.ones(nsym))
    return table + payload, {"qmin": qmin, "nsym": nsym, "k": k, "table_bytes": len(table)}


def decode_hist(data: bytes | memoryview, n: int, qmin: int, nsym: int, k: int, table_bytes: int) -> np.ndarray:
    """Decode ``n`` integers coded by :func:`encode_hist`; the stored counts must sum to ``n``."""
    qmin, nsym = _check_range(qmin, nsym)
    if not isinstance(table_bytes, (int, np.integer)) or not 0 < table_bytes <= len(data):
        raise CodingError(f"ANS: count table of {table_bytes!r} bytes does not fit a {len(data)}-byte stream")
    mv = memoryview(bytes(data))
    counts = expgolomb.decode(mv[:table_bytes], nsym, k, signed=False)
    if int(counts.sum()) != n:
        raise CodingError(f"ANS: stored counts sum to {int(counts.sum())}, expected {n} values")
    p = counts.astype(np.float64) if n else np.ones(nsym)
    return _decode(mv[table_bytes:], n, p, qmin)


def _check_range(qmin: object, nsym: object) -> tuple[int, int]:
    if not isinstance(nsym, (int, np.integer)) or not 2 <= int(nsym) <= NSYM_MAX:
        raise CodingError(f"ANS: alphabet size must be in [2, {NSYM_MAX}], got {nsym!r}")
    if not isinstance(qmin, (int, np.integer)) or abs(int(qmin)) >= 1 << 40:
        raise CodingError(f"ANS: qmin must be an integer of moderate size, got {qmin!r}")
    return int(qmin), int(nsym)
