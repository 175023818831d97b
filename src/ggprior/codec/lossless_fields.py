"""Bit patterns of bf16 / fp16 / fp32 tensors for :mod:`.lossless`: dtypes, raw views, and the
split of each pattern into its coded symbol, raw fields and low byte planes (numba kernels).

A ``W``-bit pattern is sign | exponent (``E`` bits) | mantissa (``M`` bits). With ``k`` top
mantissa bits coded alongside the exponent, :func:`split` / :func:`merge` cut a pattern into its
symbol and one *raw field* (the sign and the ``M - k`` low mantissa bits). Where the lowest ``8 L``
mantissa bits go to ``L`` byte planes (:func:`byte_planes`: plane ``j`` holds byte ``j`` of every
pattern), the same kernels run on the patterns shifted right by ``8 L`` (``M - 8 L`` mantissa
bits) and :func:`add_planes` puts the low bytes back, so the original layout keeps its kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from . import bits

# name -> (code, total bits, exponent bits, mantissa bits)
DTYPES = {"bfloat16": (1, 16, 8, 7), "float16": (2, 16, 5, 10), "float32": (3, 32, 8, 23)}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


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
        if name == "bfloat16":
            return (p.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
        if name == "float16":
            return p.astype(np.uint16).view(np.float16).astype(np.float64)
        return p.astype(np.uint32).view(np.float32).astype(np.float64)


def byte_planes(a: np.ndarray, planes: int) -> np.ndarray:
    """The lowest ``planes`` bytes of every pattern of ``a`` as a ``(planes, n)`` uint8 array."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(a.size, a.itemsize)[:, :planes].T)


# ---------------------------------------------------------------- numba kernels


@njit(cache=True)
def split(a: np.ndarray, m: int, k: int, sign_shift: int):
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
def merge(sym: np.ndarray, buf: np.ndarray, out: np.ndarray, m: int, k: int, sign_shift: int) -> None:
    """Inverse of :func:`split` into ``out`` (uint16 / uint32); ``buf`` holds the raw section plus 4 zero bytes."""
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


@njit(cache=True)
def add_planes(out: np.ndarray, planes: np.ndarray) -> None:
    """``out[i] = out[i] << 8 L | byte i of each plane`` in place: the patterns :func:`merge` built above their
    ``L`` (1 or 2) lowest bytes, completed by the ``(L, n)`` byte planes (plane 0 the lowest byte)."""
    if planes.shape[0] == 1:
        for i in range(out.shape[0]):
            out[i] = (out[i] << 8) | planes[0, i]
    else:
        for i in range(out.shape[0]):
            out[i] = (out[i] << 16) | (planes[1, i] << 8) | planes[0, i]
