"""Bit-exact lossless coding of bf16, fp16 and fp32 tensors (raw uint16 / uint32 views).

Every value is split into sign ``s``, exponent ``e`` (``E`` bits) and mantissa (``M`` bits).
The *symbol* is the exponent together with the top ``k`` mantissa bits, i.e. the magnitude
bits shifted right by ``M - k``; it is entropy-coded (rANS with an integer frequency table)
under one of two symbol models (:mod:`.lossless_models`), the smaller stream kept per tensor:

* ``hist``: the tensor's symbol histogram, quantized to integer frequencies and stored;
* ``gg``: the GG law of the magnitude intervals the symbols stand for, from three float32
  parameters (fitted to the tensor, then refined to minimise the symbol code length) and the
  range of symbols present (two u16).

``k`` (0..``KMAX``) is chosen per tensor by the estimated total size. The sign and the
``M - k`` low mantissa bits are packed raw (:mod:`.lossless_fields`), ``1 + M - k`` bits per
value, LSB first; or, with the *planes* flag, the lowest ``8 L`` of them, ``L = (M - k) // 8``
(fp32: 2, fp16 with ``k <= 2``: 1, bf16: never), go to ``L`` byte planes, each stored raw or as
one zstd frame, and the raw fields keep ``1 + M - k - 8 L`` bits. The encoder sets the flag only
where it makes the stream smaller (weights cast up from a shorter format, or with repeated low
bytes, as in MiniLM's fp32 embeddings), so a stream never grows. NaN, Inf, subnormals and -0.0
are ordinary bit patterns here.

Stream (little-endian)::

    magic "GGL1" | dtype u8 | model u8 (0 hist, 1 gg; + 0x80 planes) | k u8 | prob_bits u8 | n u64 | crc32 u32
    model: hist -> packed frequency table | gg -> mu, beta, gamma float32, smin u16, smax u16
    coded_len u64 | rANS stream (coded_len bytes)
    planes flag only, L times (plane 0 = the lowest byte): method u8 (0 raw, 1 zstd) | len u64 | len bytes
    raw fields: exactly ceil(n (1 + M - k - 8 L) / 8) bytes (L = 0 without the flag)

Streams without the flag are the original layout, byte for byte. The decoder validates every
field and length before allocating: the raw section's exact length bounds ``n`` (at least the
sign bit per value, so ``n <= 8 * len(stream)``); a raw plane is exactly ``n`` bytes; a zstd
plane is one frame that declares ``n`` bytes of content and decodes to exactly them, with no
bytes after it. It recomputes the GG table bit-identically from the float32 parameters (float64
SciPy, then :func:`quantize_freqs`) and checks the CRC-32 of the decoded bit patterns. Malformed
input raises :class:`LosslessError` (a ``ValueError``).

The container calls :func:`encode_tensor` / :func:`decode_tensor` per tensor.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import zstandard

from . import bits, rans
from .lossless_fields import DTYPES, LosslessError, add_planes, as_bits, byte_planes, dtype_info, merge, split
from .lossless_models import choose_k, code_bits, fit_gg_model, gg_freqs

KMAX = {"bfloat16": 3, "float16": 4, "float32": 3}
PROB_BITS = rans.MAX_PROB_BITS
MAGIC = b"GGL1"
HEAD = struct.Struct("<4sBBBBQI")
GG_MODEL = struct.Struct("<fffHH")
LEN = struct.Struct("<Q")
PLANE = struct.Struct("<BQ")
MODEL_HIST, MODEL_GG = 0, 1
MODEL_NAMES = {MODEL_HIST: "hist", MODEL_GG: "gg"}
PLANES_FLAG = 0x80
PLANE_RAW, PLANE_ZSTD = 0, 1
ZSTD_LEVEL = 1  # level 19 saves 0.03% of MiniLM's fp32 stream and writes 100x slower


def _n_planes(m: int, k: int) -> int:
    """Whole low mantissa bytes below the coded bits (the byte planes a flagged stream holds)."""
    return (m - k) // 8


def _code_planes(planes: np.ndarray) -> list[bytes]:
    """Each plane's section entry (method, length, payload): a zstd frame where smaller than the plane."""
    out = []
    for p in planes:
        z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(p.tobytes())
        method, payload = (PLANE_ZSTD, z) if len(z) < p.size else (PLANE_RAW, p.tobytes())
        out.append(PLANE.pack(method, len(payload)) + payload)
    return out


def encode_tensor(array, dtype_name: str, *, model: str = "auto", k: int | None = None,
                  planes: bool = True) -> bytes:
    """Lossless stream of a tensor's bit patterns (``array``: uint16/uint32 view, or a float array/tensor).

    ``model``: ``"auto"`` (the smaller of ``hist`` and ``gg``), ``"hist"`` or ``"gg"`` (falls back
    to ``hist`` where no GG fits). ``k``: top mantissa bits coded with the exponent (default: chosen).
    ``planes``: allow the byte-plane layout where it is smaller (``False``: the original layout).
    """
    name, code, w, e, m = dtype_info(dtype_name)
    if model not in ("auto", "hist", "gg"):
        raise LosslessError(f"lossless: model must be 'auto', 'hist' or 'gg', got {model!r}")
    a = as_bits(array, name)
    n = a.size
    crc = zlib.crc32(a.tobytes())
    kmax = KMAX[name]
    if k is not None and not 0 <= k <= kmax:
        raise LosslessError(f"lossless: k must be in [0, {kmax}] for {name}, got {k}")
    sign_shift = w - 1
    if n == 0:
        return HEAD.pack(MAGIC, code, MODEL_HIST, 0, PROB_BITS, 0, crc)
    mag_top = (a & np.array((1 << sign_shift) - 1, dtype=a.dtype)) >> (m - kmax)
    hist_kmax = np.bincount(mag_top.astype(np.int64), minlength=1 << (e + kmax))
    if k is None:
        k = choose_k(hist_kmax, kmax, n, m)
    counts = hist_kmax.reshape(-1, 1 << (kmax - k)).sum(axis=1)
    present = np.flatnonzero(counts)
    smin, smax = int(present[0]), int(present[-1])

    h_freqs = rans.quantize_freqs(counts, PROB_BITS)
    h_table = rans.pack_freqs(h_freqs)
    cands = [(code_bits(counts, h_freqs) + 8 * len(h_table), MODEL_HIST, h_freqs, h_table)]
    if model in ("auto", "gg"):
        prm = fit_gg_model(a, counts, name, k, smin, smax)
        if prm is not None:
            g_freqs = gg_freqs(prm, name, k, smin, smax, PROB_BITS)
            g_table = GG_MODEL.pack(*prm, smin, smax)
            cands.append((code_bits(counts, g_freqs) + 8 * len(g_table), MODEL_GG, g_freqs, g_table))
            if model == "gg":
                cands = cands[1:]
    _, kind, freqs, table = min(cands, key=lambda c: c[0])
    nplanes = _n_planes(m, k) if planes else 0
    entries = _code_planes(byte_planes(a, nplanes)) if nplanes else []
    width = 1 + m - k
    if sum(map(len, entries)) + ((n * (width - 8 * nplanes) + 7) >> 3) < (n * width + 7) >> 3:
        kind |= PLANES_FLAG
    else:
        nplanes, entries = 0, []
    drop = 8 * nplanes
    sym, raw = split(a >> drop if drop else a, m - drop, k, sign_shift - drop)
    coded = rans.encode(sym, freqs)
    head = HEAD.pack(MAGIC, code, kind, k, PROB_BITS, n, crc)
    return b"".join((head, table, LEN.pack(len(coded)), coded, *entries, raw.tobytes()))


def stream_info(data: bytes | memoryview) -> dict:
    """The header fields of a lossless stream (validated): dtype, model, k, prob_bits, n, crc32, planes (L)."""
    mv = memoryview(data)
    if len(mv) < HEAD.size:
        raise LosslessError(f"lossless: stream of {len(mv)} bytes is shorter than its {HEAD.size}-byte header")
    magic, code, kind, k, prob_bits, n, crc = HEAD.unpack(mv[: HEAD.size])
    if magic != MAGIC:
        raise LosslessError(f"lossless: bad magic {bytes(magic)!r}")
    names = {v[0]: key for key, v in DTYPES.items()}
    if code not in names:
        raise LosslessError(f"lossless: unknown dtype code {code}")
    name = names[code]
    model = kind & ~PLANES_FLAG
    if model not in MODEL_NAMES or not 0 <= k <= KMAX[name] or not rans.MIN_PROB_BITS <= prob_bits <= rans.MAX_PROB_BITS:
        raise LosslessError(f"lossless: header out of range (model {kind}, k {k}, prob_bits {prob_bits})")
    nplanes = _n_planes(DTYPES[name][3], k) if kind & PLANES_FLAG else 0
    if kind & PLANES_FLAG and (nplanes == 0 or n == 0):
        raise LosslessError(f"lossless: byte planes flagged for {name} with k {k} and {n} values")
    return {"dtype": name, "model": MODEL_NAMES[model], "k": k, "prob_bits": prob_bits, "n": n, "crc32": crc,
            "planes": nplanes}


def _plane_sections(mv: memoryview, pos: int, nplanes: int, n: int) -> tuple[list[tuple[int, memoryview]], int]:
    """The (method, payload) of each byte plane from ``pos`` and the position after them: every length checked, and
    each zstd frame's declared content size (``n``) and window (at most ``max(2 n, 1 KiB)``), not yet its content."""
    out = []
    for j in range(nplanes):
        if len(mv) - pos < PLANE.size:
            raise LosslessError(f"lossless: byte plane {j} truncated")
        method, length = PLANE.unpack(mv[pos : pos + PLANE.size])
        pos += PLANE.size
        if length > len(mv) - pos:
            raise LosslessError(f"lossless: byte plane {j} of {length} bytes, {len(mv) - pos} left")
        payload = mv[pos : pos + length]
        pos += length
        if method == PLANE_RAW and length != n:
            raise LosslessError(f"lossless: raw byte plane {j} of {length} bytes for {n} values")
        if method == PLANE_ZSTD:
            try:
                frame = zstandard.get_frame_parameters(payload)
            except zstandard.ZstdError as ex:
                raise LosslessError(f"lossless: byte plane {j}: bad zstd frame ({ex})") from ex
            if frame.content_size != n or frame.window_size > max(2 * n, 1 << 10):
                raise LosslessError(f"lossless: zstd byte plane {j} declares {frame.content_size} bytes (window "
                                    f"{frame.window_size}) for {n} values")
        elif method != PLANE_RAW:
            raise LosslessError(f"lossless: unknown byte plane method {method}")
        out.append((method, payload))
    return out, pos


def _decode_planes(sections: list[tuple[int, memoryview]], n: int) -> np.ndarray:
    """The ``(L, n)`` byte planes of checked sections (each zstd frame decoded to exactly ``n`` bytes, nothing after)."""
    planes = np.empty((len(sections), n), dtype=np.uint8)
    for j, (method, payload) in enumerate(sections):
        if method == PLANE_ZSTD:
            dobj = zstandard.ZstdDecompressor().decompressobj()
            try:
                payload = dobj.decompress(payload)
            except zstandard.ZstdError as ex:
                raise LosslessError(f"lossless: byte plane {j}: {ex}") from ex
            if not dobj.eof or dobj.unused_data or len(payload) != n:
                raise LosslessError(f"lossless: zstd byte plane {j} does not decode to exactly {n} bytes")
        planes[j] = np.frombuffer(payload, dtype=np.uint8)
    return planes


def decode_tensor(data: bytes | memoryview, dtype_name: str, n: int) -> np.ndarray:
    """Decode the ``n`` bit patterns (uint16 for bf16/fp16, uint32 for fp32) of :func:`encode_tensor`."""
    name, _, w, e, m = dtype_info(dtype_name)
    mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    info = stream_info(mv)
    if info["dtype"] != name:
        raise LosslessError(f"lossless: stream holds {info['dtype']}, {name} requested")
    if not isinstance(n, (int, np.integer)) or n < 0 or info["n"] != n:
        raise LosslessError(f"lossless: stream holds {info['n']} values, {n!r} requested")
    udt = np.uint16 if w == 16 else np.uint32
    k, prob_bits = info["k"], info["prob_bits"]
    pos = HEAD.size
    if n == 0:
        if len(mv) != pos:
            raise LosslessError("lossless: trailing bytes after an empty tensor")
        out = np.zeros(0, dtype=udt)
    else:
        width = 1 + m - k - 8 * info["planes"]
        nsym = 1 << (e + k)
        try:
            if info["model"] == "hist":
                freqs, used = rans.unpack_freqs(mv[pos:], nsym, prob_bits)
                if int(freqs.sum()) != 1 << prob_bits:
                    raise LosslessError("lossless: frequency table does not sum to 2^prob_bits")
                pos += used
            else:
                if len(mv) < pos + GG_MODEL.size:
                    raise LosslessError("lossless: GG model truncated")
                mu, beta, gamma, smin, smax = GG_MODEL.unpack(mv[pos : pos + GG_MODEL.size])
                pos += GG_MODEL.size
                if not (all(math.isfinite(v) for v in (mu, beta, gamma)) and beta > 0 and 0.05 <= gamma <= 20.0):
                    raise LosslessError(f"lossless: bad GG parameters {(mu, beta, gamma)}")
                if not smin <= smax < nsym or smax - smin + 1 > 1 << prob_bits:
                    raise LosslessError(f"lossless: symbol range [{smin}, {smax}] out of range")
                freqs = gg_freqs((mu, beta, gamma), name, k, smin, smax, prob_bits)
            if len(mv) < pos + LEN.size:
                raise LosslessError("lossless: stream truncated before the coded section")
            (clen,) = LEN.unpack(mv[pos : pos + LEN.size])
            pos += LEN.size
            if clen > len(mv) - pos:
                raise LosslessError(f"lossless: coded section of {clen} bytes, {len(mv) - pos} left")
            sections, end = _plane_sections(mv, pos + clen, info["planes"], n)
            raw_len = (n * width + 7) >> 3
            if len(mv) - end != raw_len:
                raise LosslessError(f"lossless: sections do not add up ({raw_len} raw bytes, {len(mv) - end} left)")
            sym = rans.decode(mv[pos : pos + clen], freqs, int(n))
        except LosslessError:
            raise
        except (bits.CodingError, ValueError, OverflowError) as ex:
            raise LosslessError(f"lossless: {ex}") from ex
        if (n * width) & 7 and mv[len(mv) - 1] >> ((n * width) & 7):
            raise LosslessError("lossless: nonzero padding bits after the raw fields")
        out = np.empty(n, dtype=udt)
        drop = 8 * info["planes"]
        merge(sym, bits.padded(mv[end:]), out, m - drop, k, w - 1 - drop)
        if sections:
            add_planes(out, _decode_planes(sections, n))
    if zlib.crc32(out) != info["crc32"]:
        raise LosslessError("lossless: CRC-32 mismatch (damaged stream or a model computed differently)")
    return out
