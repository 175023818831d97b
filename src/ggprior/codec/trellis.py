"""Dependent (trellis-coded) quantization of a flattened tensor, as in VVC / NNCodec, and its rANS coding.

Two scalar quantizers share the grid of multiples of a step ``D``:

    Q0: levels 2k D              (even multiples)
    Q1: levels (2k - sgn k) D    (odd multiples, and 0)

A state machine picks the quantizer of each value from the parities of the indices before it:
value ``i`` in state ``s`` uses ``Q[QUANT[s]]``, then ``s' = NEXT[s, k & 1]`` (start state 0).
``TRELLISES[4]`` is VVC's 4-state machine; ``TRELLISES[8]`` an 8-state one of the same
shift-register form (found by search, docs/results/rate_distortion/trellis.md). The decoder runs the
same machine, so it knows each value's state before reading its index: the indices are coded with
one rANS frequency table per state class (conditioning is free). The class of a state is its quantizer
(two tables): conditioning on the full state saves under 0.01 bit/weight on GG data at 1M values
(0.03 at 9.5 bits for gamma 0.5) and doubles or quadruples the tables' bytes.

Encoder: a Viterbi search over the values (``O(n * states)``) minimising

    sum (x - x_hat)^2 + lambda * bits,   lambda = lam_c * D^2

where ``bits`` of index ``k`` in a state of class ``c`` is ``-log2 p_c(k)``. The model ``p_c`` starts from
its quantizer's rounding histogram and is re-estimated from the chosen indices (``passes``
searches in all). High-rate relation: ``D(R)`` falls by 6.02 dB per bit, so
``lambda = -dD/dR = 2 ln 2 * MSE``; DQ's MSE is about ``0.3 D^2`` near the optimum, hence
``lam_c`` near 0.4 (``LAMBDA_C``, tuned on synthetic GG data). The search keeps only the
best survivor at every ``CHUNK`` values (truncated Viterbi: memory ``O(CHUNK * states)``).

Payload (:func:`encode` / :func:`decode`, little-endian; bytes in :mod:`.trellis_payload`): ``u8 states,
f32 step, u32 K, u8 prob_bits``, then per class (Q0, Q1) ``u64 count``, and for a class with ``count > 0``:
``u32 table bytes, u64 stream bytes``, the packed table (:func:`.rans_tables.pack_freqs`) and its rANS
stream. Two layouts, told apart by bit 7 of ``states``:

* clear (the original layout, still written when escaping does not pay): the tables' alphabet is ``k + K``
  in ``[0, 2K]``;
* set (escape coding): after the head ``u32 E`` (1 to K), ``u8 order`` (0 to 24), ``u64 escapes`` of class
  0 and of class 1 (each at most its class's count), ``u64 escape bytes`` and the escape stream; the
  tables' alphabet is ``k + E`` for ``|k| <= E`` and the escape symbol ``2E + 1``; the escape stream holds,
  for each escape symbol in order (class 0's, then class 1's), the Exp-Golomb code of order ``order`` of
  ``2 (|k| - E - 1) + (k < 0)`` (``|k|`` at most ``K``).

The writer chooses ``E`` and ``prob_bits`` (16, 14, 13 or 12) for the smallest payload. The decoder checks
every field before it allocates anything.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from . import rans
from . import trellis_payload as payload
from .bits import CodingError
from .quantizer import MIN_STEP, QuantError, check_step

TRELLISES: dict[int, tuple[np.ndarray, np.ndarray]] = {
    # s -> (NEXT[s, parity 0], NEXT[s, parity 1]); QUANT[s]: 0 for Q0, 1 for Q1
    4: (np.array([[0, 2], [2, 0], [1, 3], [3, 1]], dtype=np.int64), np.array([0, 0, 1, 1], dtype=np.int64)),
    8: (np.array([[0, 4], [4, 0], [1, 5], [5, 1], [6, 2], [2, 6], [7, 3], [3, 7]], dtype=np.int64),
        np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)),
}
CLASSES = payload.CLASSES
LAMBDA_C = 0.4
CHUNK = 1 << 16
K_MAX = (rans.NSYM_MAX - 1) // 2
"""Largest |index| (the coder's alphabet ``2K + 1`` stays within ``rans.NSYM_MAX``)."""


@dataclass
class DQ:
    """Indices of a dependent quantization, the state of each value, and the step and trellis."""

    indices: np.ndarray  # int32
    states: np.ndarray  # uint8: the state each value was quantized in
    step: float
    n_states: int

    def levels(self) -> np.ndarray:
        """The reconstruction of each value in units of ``step`` (int64)."""
        nxt, qs = TRELLISES[self.n_states]
        return _levels(self.indices, nxt, qs)

    def classes(self) -> np.ndarray:
        """The state class (quantizer, 0 or 1) of each value."""
        return TRELLISES[self.n_states][1][self.states]

    def values(self) -> np.ndarray:
        """The reconstructed values (float64: ``level * step``, exact)."""
        return self.levels() * self.step


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, inline="always")
def _level(j: int, q: int) -> int:
    """Magnitude of the level of index magnitude ``j`` under quantizer ``q``."""
    if q == 0:
        return 2 * j
    return 2 * j - 1 if j > 0 else 0


@njit(cache=True, nogil=True)
def _viterbi(u, nxt, qs, bits, kt, c, out_k, out_s):
    """Fill ``out_k`` (indices) and ``out_s`` (states) minimising sum (u - level)^2 + c * bits[class, k + kt]."""
    n = u.shape[0]
    ns = nxt.shape[0]
    bp_k = np.zeros((CHUNK, ns), dtype=np.int32)
    bp_s = np.zeros((CHUNK, ns), dtype=np.int8)
    j_cur = np.full(ns, np.inf)
    j_new = np.empty(ns)
    start = 0
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        j_cur[:] = np.inf
        j_cur[start] = 0.0
        for i in range(a, b):
            x = u[i]
            ax = abs(x)
            sg = 1 if x >= 0 else -1
            j_new[:] = np.inf
            for s in range(ns):
                base = j_cur[s]
                if base == np.inf:
                    continue
                q = qs[s]
                m = int(math.floor(ax * 0.5 + 0.5)) if q == 0 else int(math.floor((ax + 1.0) * 0.5 + 0.5))
                for idx in range(4):  # candidates: index 0 and the magnitudes m - 1, m, m + 1
                    jj = 0 if idx == 0 else m - 2 + idx
                    if jj < 0 or (idx > 0 and jj == 0):
                        continue
                    d = ax - _level(jj, q)
                    k = sg * jj
                    cost = base + d * d + c * bits[q, k + kt]
                    t = nxt[s, jj & 1]
                    if cost < j_new[t]:
                        j_new[t] = cost
                        bp_k[i - a, t] = k
                        bp_s[i - a, t] = s
            j_cur[:] = j_new
        best = 0
        for s in range(1, ns):
            if j_cur[s] < j_cur[best]:
                best = s
        start = best
        t = best
        for i in range(b - 1, a - 1, -1):
            out_k[i] = bp_k[i - a, t]
            t = bp_s[i - a, t]
            out_s[i] = t
    return out_k, out_s


@njit(cache=True, nogil=True)
def _levels(k, nxt, qs):
    """Levels (multiples of the step) of indices ``k``, running the state machine from state 0."""
    out = np.empty(k.shape[0], dtype=np.int64)
    s = 0
    for i in range(k.shape[0]):
        v = np.int64(k[i])
        j = abs(v)
        lev = _level(j, qs[s])
        out[i] = lev if v >= 0 else -lev
        s = nxt[s, j & 1]
    return out


@njit(cache=True, nogil=True)
def _walk(syms, offsets, counts, nxt, qs, out, states):
    """Indices from the per-class arrays (``syms[offsets[c]:...]``) in the order the machine visits them, and the
    state of each. Status 0 ok, 1 a class's symbols ran out, 2 some were left over.
    """
    pos = np.zeros(CLASSES, dtype=np.int64)
    s = 0
    for i in range(out.shape[0]):
        c = qs[s]
        if pos[c] >= counts[c]:
            return 1
        v = syms[offsets[c] + pos[c]]
        pos[c] += 1
        out[i] = v
        states[i] = s
        s = nxt[s, abs(v) & 1]
    for c in range(CLASSES):
        if pos[c] != counts[c]:
            return 2
    return 0


# ----------------------------------------------------------------------------- quantization


def _nearest(u: np.ndarray, q: int) -> np.ndarray:
    """Index of the nearest level of quantizer ``q`` (the scalar quantizer), for the starting rate model."""
    a = np.abs(u)
    m = np.floor(a * 0.5 + 0.5) if q == 0 else np.where(a < 0.5, 0.0, np.floor((a + 1.0) * 0.5 + 0.5))
    return (np.sign(u) * m).astype(np.int64)


def _bits(counts: np.ndarray) -> np.ndarray:
    """-log2 of each class's smoothed index probabilities (half a count added to every index)."""
    p = counts + 0.5
    return -np.log2(p / p.sum(axis=1, keepdims=True))


def quantize(t: torch.Tensor | np.ndarray, step: float, *, n_states: int = 4, lam_c: float = LAMBDA_C,
             passes: int = 3, name: str = "tensor") -> DQ:
    """Dependent quantization of the flattened ``t`` at ``step`` (float32-rounded), ``passes`` Viterbi searches."""
    if n_states not in TRELLISES:
        raise QuantError(f"{name}: trellis states must be one of {sorted(TRELLISES)}, got {n_states!r}")
    if not (lam_c >= 0.0 and math.isfinite(lam_c)) or passes < 1:
        raise QuantError(f"{name}: need lam_c >= 0 and passes >= 1, got {lam_c!r}, {passes!r}")
    s = check_step(step, name)
    x = t.detach().reshape(-1).double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64).ravel()
    if x.size and not np.isfinite(x).all():
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
    u = np.ascontiguousarray(x / s)
    kt = int(np.abs(u).max() * 0.5) + 2 if u.size else 2
    if kt - 1 > K_MAX:
        raise QuantError(f"{name}: step {s:g} is too small for a trellis (|index| would exceed {K_MAX})")
    nxt, qs = TRELLISES[n_states]
    counts = np.zeros((CLASSES, 2 * kt + 1))
    for c in range(CLASSES):
        counts[c] = np.bincount(_nearest(u, c) + kt, minlength=2 * kt + 1)
    k = np.empty(u.size, dtype=np.int32)
    states = np.empty(u.size, dtype=np.int8)
    for _ in range(passes):
        _viterbi(u, nxt, qs, _bits(counts), kt, float(lam_c), k, states)
        counts = np.zeros((CLASSES, 2 * kt + 1))
        np.add.at(counts, (qs[states], k.astype(np.int64) + kt), 1.0)
    return DQ(k, states.astype(np.uint8), s, n_states)


def ideal_bits(dq: DQ) -> float:
    """Empirical conditional entropy of the indices given the state's class, in bits (all values)."""
    total = 0.0
    cls = dq.classes()
    for c in range(CLASSES):
        k = dq.indices[cls == c]
        if k.size:
            c = np.unique(k, return_counts=True)[1].astype(np.float64)
            total -= float((c * np.log2(c / k.size)).sum())
    return total


# ----------------------------------------------------------------------------- payload


def encode(dq: DQ, prob_bits: int | None = None, *, escape: bool = True) -> bytes:
    """The payload of ``dq`` (layouts in the module docstring): one rANS table and stream per class.

    The escape bound and ``prob_bits`` give the smallest payload (:mod:`.trellis_payload`); a ``prob_bits`` fixes
    it, ``escape=False`` keeps the original layout (``escape=False, prob_bits=16``: the bytes written before escape
    coding)."""
    kk = max(1, int(np.abs(dq.indices).max()) if dq.indices.size else 1)
    if kk > K_MAX:
        raise QuantError(f"trellis: |index| {kk} exceeds {K_MAX}")
    return payload.write(dq.indices.astype(np.int64), dq.classes(), dq.n_states, dq.step, kk, prob_bits, escape)


def decode(data: bytes | memoryview, n: int, name: str = "tensor") -> DQ:
    """The indices of ``n`` values from a payload of :func:`encode`; raises :class:`CodingError` naming ``name``."""
    try:
        return _decode(data, n, name)
    except CodingError as e:
        if str(e).startswith(f"{name}: "):
            raise
        raise CodingError(f"{name}: {e}") from None


def _decode(data: bytes | memoryview, n: int, name: str) -> DQ:
    n_states, step, counts, flat = payload.read(data, n, TRELLISES, name)
    offsets = np.zeros(CLASSES, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)[:-1]
    nxt, qs = TRELLISES[n_states]
    k = np.empty(n, dtype=np.int32)
    states = np.empty(n, dtype=np.uint8)
    if _walk(flat, offsets, counts, nxt, qs, k, states):
        raise CodingError(f"{name}: trellis indices do not follow the state machine (damaged payload)")
    return DQ(k, states, float(step), n_states)


# ----------------------------------------------------------------------------- tensors in a .ggz file

FILE_STATES = 8
"""States of the trellis the file writer uses: 8 beat 4 by 0.015 bit/weight at equal MSE on every measured tensor
group and rate (docs/results/rate_distortion/trellis.md)."""
STEP_RATIO = 0.565
"""Trellis step per scalar step at equal MSE: a rule's step ``s`` (``--rel-error``, ``--bits``, ``--step``,
chosen for rounding) becomes ``STEP_RATIO * s``, whose trellis MSE is within 3 % of the scalar's
``s^2 / 12`` on GG data (``LAMBDA_C``; MSE / step^2 is 0.25 to 0.27 with 4 states, 0.24 to 0.26 with 8)."""


def file_step(rule_step: float, name: str = "tensor") -> float:
    """The trellis step of a scalar rule's step: ``STEP_RATIO`` times it (float32, at least ``MIN_STEP``)."""
    return check_step(max(rule_step * STEP_RATIO, MIN_STEP), name)


def side_bytes(data: bytes) -> int:
    """Bytes of a payload of :func:`encode` that are not coded indices (head, escape block, counts, sizes, tables)."""
    return payload.side_bytes(data)


def encode_tensor(t: torch.Tensor, step: float, n_states: int, chunk_values: int, pool: Executor,
                  name: str = "tensor") -> list[tuple[int, bytes]]:
    """``(n, payload)`` of each chunk of the flattened ``t``: chunks are quantized on their own (the machine
    restarts at state 0) and in parallel."""
    flat = t.detach().reshape(-1)
    bounds = [(a, min(flat.numel(), a + chunk_values)) for a in range(0, flat.numel(), chunk_values)]

    def one(ab: tuple[int, int]) -> tuple[int, bytes]:
        return ab[1] - ab[0], encode(quantize(flat[ab[0]:ab[1]], step, n_states=n_states, name=name))

    return list(pool.map(one, bounds))
