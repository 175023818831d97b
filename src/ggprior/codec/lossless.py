"""Bit-exact lossless coding of bf16, fp16 and fp32 tensors (raw uint16 / uint32 views).

Every value is split into sign ``s``, exponent ``e`` (``E`` bits) and mantissa (``M`` bits).
The *symbol* is the exponent together with the top ``k`` mantissa bits, i.e. the magnitude
bits shifted right by ``M - k``; it is entropy-coded (rANS with an integer frequency table).
The sign and the ``M - k`` low mantissa bits are packed raw, ``1 + M - k`` bits per value, LSB
first. Each symbol stands for one interval of magnitudes, ``[v(sym << (M-k)), v((sym+1) << (M-k)))``
(``v`` = the float value of a bit pattern), so a GG law predicts the symbol distribution:

    P(sym) = P(|X| in [lo, hi)) = G(lo, hi) + G(-hi, -lo),   X ~ GG(mu, beta, gamma)

which generalises the exponent law ``P(e) = P(|X| in [2^e, 2^(e+1)))`` to the
exponent-conditioned top mantissa bits (the density falls across a binade, so the top
mantissa bits are not uniform). Two symbol models, the smaller stream is kept per tensor:

* ``hist``: the tensor's symbol histogram, quantized to integer frequencies and stored;
* ``gg``: the GG law above from three float32 parameters (fitted to the tensor, then refined
  to minimise the symbol code length) and the range of symbols present (two u16).

``k`` (0..``KMAX``) is chosen per tensor by the estimated total size. NaN, Inf, subnormals and
-0.0 are ordinary bit patterns here: symbols of the NaN/Inf exponent have GG mass 0 and get
frequency 1 inside the coded range; the GG fit uses the finite values only.

Stream (little-endian)::

    magic "GGL1" | dtype u8 | model u8 (0 hist, 1 gg) | k u8 | prob_bits u8 | n u64 | crc32 u32
    model: hist -> packed frequency table | gg -> mu, beta, gamma float32, smin u16, smax u16
    coded_len u64 | rANS stream (coded_len bytes) | raw fields: exactly ceil(n (1 + M - k) / 8) bytes

The decoder validates every field before allocating (the raw section's exact length bounds
``n`` by the stream size), recomputes the GG table bit-identically from the float32
parameters (float64 SciPy, then :func:`quantize_freqs`), and checks the CRC-32 of the decoded
bit patterns. Malformed input raises :class:`LosslessError` (a ``ValueError``).

The container calls :func:`encode_tensor` / :func:`decode_tensor` per tensor.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch
from numba import njit

from ..gg import fit as gg_fit
from . import (
    bits,
    ggmodel,
    rans,  # the table-driven numba rANS (copied from wt-speed)
)

# name -> (code, total bits, exponent bits, mantissa bits)
DTYPES = {"bfloat16": (1, 16, 8, 7), "float16": (2, 16, 5, 10), "float32": (3, 32, 8, 23)}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
KMAX = {"bfloat16": 3, "float16": 4, "float32": 3}
PROB_BITS = rans.MAX_PROB_BITS
MAGIC = b"GGL1"
HEAD = struct.Struct("<4sBBBBQI")
GG_MODEL = struct.Struct("<fffHH")
LEN = struct.Struct("<Q")
MODEL_HIST, MODEL_GG = 0, 1
MODEL_NAMES = {MODEL_HIST: "hist", MODEL_GG: "gg"}
P_FLOOR = 2.0**-30


class LosslessError(bits.CodingError):
    """A lossless stream cannot be written or read (bad dtype, damaged or truncated data)."""


def dtype_info(dtype_name: str) -> tuple[str, int, int, int, int]:
    """(canonical name, code, W, E, M) of a dtype name (``bfloat16``/``bf16``, ``float16``, ``float32``)."""
    name = ALIASES.get(str(dtype_name).lower(), str(dtype_name).lower())
    if name not in DTYPES:
        raise LosslessError(f"lossless: unsupported dtype {dtype_name!r}; expected one of {sorted(DTYPES)}")
    return (name, *DTYPES[name])


def as_bits(array, dtype_name: str) -> np.ndarray:
    """The flat raw bit patterns (uint16 / uint32) of a NumPy array or torch tensor of ``dtype_name``."""
    name, _, w, _, _ = dtype_info(dtype_name)
    udt = np.uint16 if w == 16 else np.uint32
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu().contiguous().reshape(-1)
        if t.is_floating_point():
            want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
            if t.dtype != want:
                raise LosslessError(f"lossless: tensor of dtype {t.dtype} given for {name}")
            t = t.view(torch.int16 if w == 16 else torch.int32)
        array = t.numpy()
    a = np.ascontiguousarray(np.asarray(array)).reshape(-1)
    if a.dtype.kind == "f" and a.dtype.itemsize * 8 == w and name != "bfloat16":
        a = a.view(udt)
    if a.dtype.kind not in "iu" or a.dtype.itemsize * 8 != w:
        raise LosslessError(f"lossless: {name} needs a {w}-bit integer view, got dtype {a.dtype}")
    return a.view(udt)


def values_of(patterns: np.ndarray, dtype_name: str) -> np.ndarray:
    """float64 values of bit patterns (any integer array) of ``dtype_name``."""
    name, _, w, _, _ = dtype_info(dtype_name)
    p = np.asarray(patterns)
    with np.errstate(invalid="ignore", over="ignore"):
        return _values_of(p, name)


def _values_of(p: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        return (p.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if name == "float16":
        return p.astype(np.uint16).view(np.float16).astype(np.float64)
    return p.astype(np.uint32).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------- numba kernels


@njit(cache=True)
def _split(a: np.ndarray, m: int, k: int, sign_shift: int):
    """Symbols (magnitude >> (m - k), uint16) and the raw fields (sign, low m - k bits) of ``a``.

    Raw fields are ``1 + m - k`` bits each, packed LSB first: field ``i`` starts at bit ``i * width``
    of the little-endian byte string, so the decoder reads each one with a 4-byte load.
    """
    n = a.shape[0]
    width = 1 + m - k
    sh = np.uint64(m - k)
    low = (np.uint64(1) << sh) - np.uint64(1)
    smask = (np.uint64(1) << np.uint64(sign_shift)) - np.uint64(1)
    sym = np.empty(n, dtype=np.uint16)
    nbytes = (n * width + 7) >> 3
    out = np.zeros(nbytes + 8, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = np.uint64(0)
    p = 0
    w = np.uint64(width)
    for i in range(n):
        v = np.uint64(a[i])
        mag = v & smask
        sym[i] = np.uint16(mag >> sh)
        raw = ((v >> np.uint64(sign_shift)) << sh) | (mag & low)
        acc |= raw << nacc
        nacc += w
        if nacc >= np.uint64(32):
            out[p] = np.uint8(acc & np.uint64(0xFF))
            out[p + 1] = np.uint8((acc >> np.uint64(8)) & np.uint64(0xFF))
            out[p + 2] = np.uint8((acc >> np.uint64(16)) & np.uint64(0xFF))
            out[p + 3] = np.uint8((acc >> np.uint64(24)) & np.uint64(0xFF))
            p += 4
            acc >>= np.uint64(32)
            nacc -= np.uint64(32)
    while nacc > np.uint64(0):
        out[p] = np.uint8(acc & np.uint64(0xFF))
        p += 1
        acc >>= np.uint64(8)
        nacc = nacc - np.uint64(8) if nacc > np.uint64(8) else np.uint64(0)
    return sym, out[:nbytes]


@njit(cache=True)
def _merge(sym: np.ndarray, buf: np.ndarray, out: np.ndarray, m: int, k: int, sign_shift: int) -> None:
    """Inverse of :func:`_split` into ``out`` (uint16 / uint32); ``buf`` holds the raw section plus 4 zero bytes."""
    width = 1 + m - k
    sh = np.uint32(m - k)
    low = (np.uint32(1) << sh) - np.uint32(1)
    mask = (np.uint32(1) << np.uint32(width)) - np.uint32(1)
    ssh = np.uint32(sign_shift)
    for i in range(out.shape[0]):
        pos = i * width
        b = pos >> 3
        word = (np.uint32(buf[b]) | (np.uint32(buf[b + 1]) << np.uint32(8)) | (np.uint32(buf[b + 2]) << np.uint32(16))
                | (np.uint32(buf[b + 3]) << np.uint32(24)))
        raw = (word >> np.uint32(pos & 7)) & mask
        out[i] = ((raw >> sh) << ssh) | (np.uint32(sym[i]) << sh) | (raw & low)


# ---------------------------------------------------------------- models


def _entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * (np.log2(c) - math.log2(n))).sum()) if n else 0.0


def _code_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Ideal code length of a histogram under an integer table (inf if a present symbol has freq 0)."""
    nz = counts > 0
    if np.any(freqs[nz] == 0):
        return math.inf
    total = float(freqs.sum())
    return float(-(counts[nz] * np.log2(freqs[nz] / total)).sum())


def gg_symbol_probs(params: tuple[float, float, float], name: str, k: int, smin: int, smax: int) -> np.ndarray:
    """GG mass of every symbol in [smin, smax] (magnitude intervals, see the module doc), float64, unnormalised."""
    _, _, _, _, m = dtype_info(name)
    s = np.arange(smin, smax + 2, dtype=np.int64) << (m - k)
    edges = values_of(s, name)
    lo, hi = edges[:-1], edges[1:]
    ok = np.isfinite(lo)
    hi = np.where(np.isfinite(hi), hi, np.inf)
    lo0 = np.where(ok, lo, 0.0)
    hi0 = np.where(ok, hi, 0.0)
    p = ggmodel.GGParams(*params)
    mass = ggmodel.interval_mass(lo0, hi0, p) + ggmodel.interval_mass(-hi0, -lo0, p)
    return np.where(ok & np.isfinite(mass), mass, 0.0)


def gg_freqs(params: tuple[float, float, float], name: str, k: int, smin: int, smax: int, prob_bits: int) -> np.ndarray:
    """The integer table of the GG model: nonzero exactly on [smin, smax] (deterministic from float32 params)."""
    _, _, _, e, _ = dtype_info(name)
    mass = gg_symbol_probs(params, name, k, smin, smax)
    tot = mass.sum()
    p = np.full(mass.size, 1.0) if not (math.isfinite(tot) and tot > 0) else mass / tot
    full = np.zeros(1 << (e + k), dtype=np.float64)
    full[smin : smax + 1] = np.maximum(p, P_FLOOR)
    return rans.quantize_freqs(full, prob_bits)


def _f32(v: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def fit_gg_model(a: np.ndarray, counts: np.ndarray, name: str, k: int, smin: int, smax: int):
    """float32 (mu, beta, gamma) minimising the symbol code length; None if no GG fits (too few finite values)."""
    x = values_of(a[:: max(1, a.size // (1 << 20))], name)
    x = x[np.isfinite(x)]
    if x.size < 2 or float(np.ptp(x)) == 0.0:
        return None
    try:
        f = gg_fit(torch.from_numpy(x))
    except ValueError:
        return None
    scale = max(abs(f.mu), f.beta, 1e-30)
    sub = counts[smin : smax + 1].astype(np.float64)

    def params(v):
        g = math.exp(min(max(v[2], math.log(0.05)), math.log(20.0)))
        return (_f32(v[0] * scale), _f32(math.exp(v[1])), _f32(g))

    def cost(v):
        prm = params(v)
        if not all(math.isfinite(t) for t in prm) or prm[1] <= 0 or prm[2] <= 0:
            return math.inf
        mass = gg_symbol_probs(prm, name, k, smin, smax)
        tot = mass.sum()
        if not (math.isfinite(tot) and tot > 0):
            return math.inf
        return float(-(sub * np.log2(np.maximum(mass / tot, P_FLOOR))).sum())

    x0 = np.array([f.mu / scale, math.log(f.beta), math.log(f.gamma)])
    best = x0
    if math.isfinite(cost(x0)):
        from scipy import optimize  # only when fitting the exponent law; keeps SciPy's optimizer out of decoding

        res = optimize.minimize(cost, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-3, "maxiter": 200})
        if res.fun <= cost(x0):
            best = res.x
    prm = params(best)
    return prm if math.isfinite(cost(best)) else None


# ---------------------------------------------------------------- encode / decode


def _choose_k(hist_kmax: np.ndarray, kmax: int, n: int, m: int) -> int:
    best, best_bits = 0, math.inf
    for k in range(kmax + 1):
        h = hist_kmax.reshape(-1, 1 << (kmax - k)).sum(axis=1)
        est = _entropy_bits(h) + 14 * np.count_nonzero(h) + n * (1 + m - k)
        if est < best_bits - 1e-9:
            best, best_bits = k, est
    return best


def encode_tensor(array, dtype_name: str, *, model: str = "auto", k: int | None = None) -> bytes:
    """Lossless stream of a tensor's bit patterns (``array``: uint16/uint32 view, or a float array/tensor).

    ``model``: ``"auto"`` (the smaller of ``hist`` and ``gg``), ``"hist"`` or ``"gg"`` (falls back
    to ``hist`` where no GG fits). ``k``: top mantissa bits coded with the exponent (default: chosen).
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
        k = _choose_k(hist_kmax, kmax, n, m)
    counts = hist_kmax.reshape(-1, 1 << (kmax - k)).sum(axis=1)
    present = np.flatnonzero(counts)
    smin, smax = int(present[0]), int(present[-1])

    h_freqs = rans.quantize_freqs(counts, PROB_BITS)
    h_table = rans.pack_freqs(h_freqs)
    cands = [(_code_bits(counts, h_freqs) + 8 * len(h_table), MODEL_HIST, h_freqs, h_table)]
    if model in ("auto", "gg"):
        prm = fit_gg_model(a, counts, name, k, smin, smax)
        if prm is not None:
            g_freqs = gg_freqs(prm, name, k, smin, smax, PROB_BITS)
            g_table = GG_MODEL.pack(*prm, smin, smax)
            cands.append((_code_bits(counts, g_freqs) + 8 * len(g_table), MODEL_GG, g_freqs, g_table))
            if model == "gg":
                cands = cands[1:]
    _, kind, freqs, table = min(cands, key=lambda c: c[0])
    sym, raw = _split(a, m, k, sign_shift)
    coded = rans.encode(sym, freqs)
    head = HEAD.pack(MAGIC, code, kind, k, PROB_BITS, n, crc)
    return b"".join((head, table, LEN.pack(len(coded)), coded, raw.tobytes()))


def stream_info(data: bytes | memoryview) -> dict:
    """The header fields of a lossless stream (validated): dtype, model, k, prob_bits, n."""
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
    if kind not in MODEL_NAMES or not 0 <= k <= KMAX[name] or not rans.MIN_PROB_BITS <= prob_bits <= rans.MAX_PROB_BITS:
        raise LosslessError(f"lossless: header out of range (model {kind}, k {k}, prob_bits {prob_bits})")
    return {"dtype": name, "model": MODEL_NAMES[kind], "k": k, "prob_bits": prob_bits, "n": n, "crc32": crc}


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
        width = 1 + m - k
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
            raw_len = (n * width + 7) >> 3
            if clen > len(mv) - pos or len(mv) - pos - clen != raw_len:
                raise LosslessError(
                    f"lossless: sections do not add up ({clen} coded + {raw_len} raw bytes, {len(mv) - pos} left)"
                )
            sym = rans.decode(mv[pos : pos + clen], freqs, int(n))
        except LosslessError:
            raise
        except (bits.CodingError, ValueError, OverflowError) as ex:
            raise LosslessError(f"lossless: {ex}") from ex
        pos += clen
        if (n * width) & 7 and mv[len(mv) - 1] >> ((n * width) & 7):
            raise LosslessError("lossless: nonzero padding bits after the raw fields")
        out = np.empty(n, dtype=udt)
        _merge(sym, bits.padded(mv[pos:]), out, m, k, w - 1)
    if zlib.crc32(out) != info["crc32"]:
        raise LosslessError("lossless: CRC-32 mismatch (damaged stream or a model computed differently)")
    return out
