"""The bytes of a trellis payload (:func:`.trellis.encode` / :func:`.trellis.decode`; layouts in
:mod:`.trellis`'s docstring and docs/format.md section 3): per-class rANS streams of the indices, and
escape coding of the index tails.

A few outliers stretch the index range ``[-K, K]``, and with it the two frequency tables, whose every
entry is stored. With escape coding (flag ``ESCAPE`` in the head's ``states`` byte) the tables cover
``[-E, E]`` plus one escape symbol; an index with ``|k| > E`` is coded as the escape symbol in its class's
stream and its value goes to a side stream of Exp-Golomb codes of ``2 (|k| - E - 1) + (k < 0)``.
The writer picks ``E`` among quantiles of ``|k|`` (``QUANTILES``; ``E = K``: no escape, the original
layout) and ``prob_bits`` among ``PROB_BITS_CHOICES``, the pair with the smallest payload estimated
from the exact table bytes, the exact escape bits and the ideal code length under the quantized
tables (the rANS streams' real size is within a few bytes of it, the same for every pair).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Container

import numpy as np

from . import expgolomb, rans
from .bits import CodingError

CLASSES = 2
HEAD = struct.Struct("<BfIB")  # states (| ESCAPE), step, K, prob_bits
COUNT = struct.Struct("<Q")
SIZES = struct.Struct("<IQ")
ESC = struct.Struct("<IBQQQ")  # E, Exp-Golomb order, escapes in class 0, in class 1, escape stream bytes
ESCAPE = 0x80
"""Flag in the head's ``states`` byte: the escape layout (an ``ESC`` block after the head)."""
PROB_BITS_CHOICES = (16, 14, 13, 12)
QUANTILES = (1.0, 0.99999, 0.9999, 0.999, 0.99)
EG_ORDER_MAX = 24


def _bound(mag_counts: np.ndarray, q: float) -> int:
    """The smallest ``e`` with at least a fraction ``q`` of the magnitudes ``<= e`` (histogram of ``|k|``)."""
    return int(np.searchsorted(np.cumsum(mag_counts), q * mag_counts.sum() - 1e-9 * mag_counts.sum()))


def _fold(h: np.ndarray, kk: int, e: int) -> np.ndarray:
    """A class's counts over ``k + K`` (``2K + 1`` entries) as counts over the escape alphabet of bound ``e``
    (``k + e`` for ``|k| <= e``, then the escape symbol ``2e + 1``), or ``h`` itself when ``e == K``."""
    if e == kk:
        return h
    return np.concatenate([h[kk - e:kk + e + 1], [h[:kk - e].sum() + h[kk + e + 1:].sum()]])


def _escape_values(k: np.ndarray, e: int) -> np.ndarray:
    """The side stream's values of the indices ``k`` with ``|k| > e``, in order: ``2 (|k| - e - 1) + (k < 0)``."""
    x = k[np.abs(k) > e]
    return 2 * (np.abs(x) - e - 1) + (x < 0)


def _class_bytes(h: np.ndarray, pb: int) -> float:
    """Estimated bytes of a class's section: sizes, table, and the ideal code under the quantized table plus the
    coder's states. ``inf`` where the table cannot be made at ``pb`` (more present symbols than slots)."""
    try:
        f = rans.quantize_freqs(h, pb)
    except CodingError:
        return math.inf
    nz = h > 0
    bits = float((h[nz] * (pb - np.log2(f[nz].astype(np.float64)))).sum())
    return SIZES.size + len(rans.pack_freqs(f)) + bits / 8 + rans.HEADER_BYTES


def choose(k: np.ndarray, cls: np.ndarray, kk: int, prob_bits: int | None, escape: bool) -> tuple[int, int]:
    """``(E, prob_bits)`` of the smallest payload of the indices ``k`` in classes ``cls`` (``E == K``: no escape)."""
    lo, hi = rans.MIN_PROB_BITS, rans.MAX_PROB_BITS
    if prob_bits is not None and (not isinstance(prob_bits, (int, np.integer)) or isinstance(prob_bits, bool)
                                  or not lo <= prob_bits <= hi):
        raise CodingError(f"trellis: prob_bits must be an integer in [{lo}, {hi}], got {prob_bits!r}")
    pbs = PROB_BITS_CHOICES if prob_bits is None else (int(prob_bits),)
    hists = [np.bincount(k[cls == c] + kk, minlength=2 * kk + 1) for c in range(CLASSES)]
    mags = np.bincount(np.abs(k), minlength=kk + 1) if k.size else np.zeros(kk + 1, dtype=np.int64)
    es = sorted({min(kk, max(1, _bound(mags, q))) for q in QUANTILES} | {kk}) if escape and k.size else [kk]
    best = (math.inf, kk, pbs[0])
    for e in es:
        side = HEAD.size
        if e < kk:
            vals = _escape_values(k, e)
            u, c = np.unique(vals, return_counts=True)
            side += ESC.size + (expgolomb.best_order(u, c, signed=False, k_max=EG_ORDER_MAX)[1] + 7) // 8
        for pb in pbs:
            size = side + sum(COUNT.size + (_class_bytes(_fold(h, kk, e), pb) if h.any() else 0) for h in hists)
            if size < best[0]:
                best = (size, e, pb)
    if best[0] == math.inf:  # no table fits any prob_bits: let the coder say why
        rans.quantize_freqs(hists[0] if hists[0].any() else hists[1], pbs[-1])
    return best[1], best[2]


def write(k: np.ndarray, cls: np.ndarray, n_states: int, step: float, kk: int, prob_bits: int | None = None,
          escape: bool = True) -> bytes:
    """The payload of the indices ``k`` (int64) in state classes ``cls``: ``escape=False`` and a ``prob_bits``
    give the original layout exactly; otherwise the smallest of the choices (:func:`choose`)."""
    e, pb = choose(k, cls, kk, prob_bits, escape)
    out = [HEAD.pack(n_states | (ESCAPE if e < kk else 0), step, kk, pb)]
    if e < kk:
        vals = [_escape_values(k[cls == c], e) for c in range(CLASSES)]
        allv = np.concatenate(vals)
        u, cnt = np.unique(allv, return_counts=True)
        order = expgolomb.best_order(u, cnt, signed=False, k_max=EG_ORDER_MAX)[0]
        side = expgolomb.encode(allv, order, signed=False)
        out += [ESC.pack(e, order, vals[0].size, vals[1].size, len(side)), side]
    for c in range(CLASSES):
        kc = k[cls == c]
        out.append(COUNT.pack(kc.size))
        if kc.size:
            sym = np.where(np.abs(kc) > e, 2 * e + 1, kc + e) if e < kk else kc + kk
            f = rans.quantize_freqs(np.bincount(sym, minlength=2 * e + 1 + (e < kk)), pb)
            table, stream = rans.pack_freqs(f), rans.encode(sym, f)
            out += [SIZES.pack(len(table), len(stream)), table, stream]
    return b"".join(out)


def read(data: bytes | memoryview, n: int, states: Container[int], name: str
         ) -> tuple[int, float, np.ndarray, np.ndarray]:
    """``(states, step, counts, indices)`` of a payload of :func:`write` holding ``n`` indices: ``indices``
    (int32) are class 0's in order, then class 1's. Every field is checked before anything is allocated."""
    mv = memoryview(data)
    if len(mv) < HEAD.size:
        raise CodingError(f"{name}: trellis payload truncated ({len(mv)} bytes)")
    n_states, step, kk, pb = HEAD.unpack_from(mv, 0)
    esc_layout, n_states = bool(n_states & ESCAPE), n_states & ~ESCAPE
    if n_states not in states:
        raise CodingError(f"{name}: trellis states {n_states} not one of {sorted(states)}")
    if not (math.isfinite(step) and step > 0.0):
        raise CodingError(f"{name}: trellis step {step!r} is not a finite number > 0")
    if not 1 <= kk <= (rans.NSYM_MAX - 1) // 2 or not rans.MIN_PROB_BITS <= pb <= rans.MAX_PROB_BITS:
        raise CodingError(f"{name}: trellis index range {kk} or prob_bits {pb} out of bounds")
    pos, e, esc, side = HEAD.size, kk, [0] * CLASSES, None  # Python ints: a u64 field may exceed int64
    if esc_layout:
        if pos + ESC.size > len(mv):
            raise CodingError(f"{name}: trellis payload truncated in its escape block")
        e, order, esc[0], esc[1], ls = ESC.unpack_from(mv, pos)
        pos += ESC.size
        if not 1 <= e <= kk or order > EG_ORDER_MAX:
            raise CodingError(f"{name}: trellis escape bound {e} (index range {kk}) or order {order} out of bounds")
        if e == kk and any(esc):
            raise CodingError(f"{name}: trellis escapes {esc} with the bound at the index range {kk}")
        if pos + ls > len(mv):
            raise CodingError(f"{name}: trellis escape stream of {ls} bytes past the payload's end")
        side = (mv[pos:pos + ls], order)
        pos += ls
    nsym = 2 * e + 1 + esc_layout
    counts, streams = [0] * CLASSES, []
    for c in range(CLASSES):
        if pos + COUNT.size > len(mv):
            raise CodingError(f"{name}: trellis payload truncated in class {c}")
        (counts[c],) = COUNT.unpack_from(mv, pos)
        pos += COUNT.size
        if counts[c] > n or esc[c] > counts[c]:
            raise CodingError(f"{name}: trellis class {c} claims {counts[c]} of {n} values, {esc[c]} escapes")
        if counts[c]:
            if pos + SIZES.size > len(mv):
                raise CodingError(f"{name}: trellis payload truncated in class {c}")
            lt, ls = SIZES.unpack_from(mv, pos)
            pos += SIZES.size
            if pos + lt + ls > len(mv):
                raise CodingError(f"{name}: trellis payload truncated in class {c}")
            f, used = rans.unpack_freqs(mv[pos:pos + lt], nsym, pb)
            if used != lt:
                raise CodingError(f"{name}: trellis table of class {c} is {used} bytes, header says {lt}")
            streams.append((mv[pos + lt:pos + lt + ls], f, counts[c]))
            pos += lt + ls
    if pos != len(mv):
        raise CodingError(f"{name}: {len(mv) - pos} bytes left over after the trellis payload")
    if sum(counts) != n:
        raise CodingError(f"{name}: trellis classes hold {sum(counts)} values, expected {n}")
    counts = np.array(counts, dtype=np.int64)
    vals = expgolomb.decode(side[0], sum(esc), side[1], signed=False) if esc_layout else None
    syms = [rans.decode(b, f, cnt) for b, f, cnt in streams]
    flat = np.concatenate(syms) if syms else np.zeros(0, dtype=np.int32)
    if not esc_layout:
        return n_states, step, counts, flat - np.int32(kk)
    hit = flat == 2 * e + 1
    split = int(counts[0])
    got = [int(hit[:split].sum()), int(hit[split:].sum())]
    if got != esc:
        raise CodingError(f"{name}: trellis streams hold {got} escapes, the escape block {esc}")
    mag = e + 1 + (vals >> 1)
    if vals.size and int(mag.max()) > kk:
        raise CodingError(f"{name}: trellis escaped index {int(mag.max())} beyond the index range {kk}")
    flat -= np.int32(e)
    flat[hit] = np.where(vals & 1, -mag, mag).astype(np.int32)
    return n_states, step, counts, flat


def side_bytes(payload: bytes) -> int:
    """Bytes of a payload that are not coded indices (head, escape block, counts, sizes, tables): its rANS
    streams and escape stream grow with the values, the rest does not."""
    n_states, _, kk, _ = HEAD.unpack_from(payload, 0)
    pos = side = HEAD.size
    if n_states & ESCAPE:
        ls = ESC.unpack_from(payload, pos)[-1]
        pos, side = pos + ESC.size + ls, side + ESC.size
    for _ in range(CLASSES):
        (count,) = COUNT.unpack_from(payload, pos)
        pos, side = pos + COUNT.size, side + COUNT.size
        if count:
            lt, ls = SIZES.unpack_from(payload, pos)
            pos, side = pos + SIZES.size + lt + ls, side + SIZES.size + lt
    return side
