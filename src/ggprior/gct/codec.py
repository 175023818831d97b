"""Gradient messages for GCT: rate-constrained quantization and a self-describing coded frame.

Quantization (:func:`rate_quantize`): q = round(x / step), optionally rate-constrained: with
``lam > 0`` each value may instead take the next integer towards zero when that lowers

    (x / step - q)^2 + lam * L(q),

L(q) the Exp-Golomb order-0 length of zigzag(q) in bits (SPEC.md section 4) -- the Lagrangian of
distortion (in step^2 units) and rate that the GG-shaped gradients make worth it: most values
sit near zero, where dropping one level saves 2 bits. ``lam = 0`` is plain rounding.

Frame (:func:`encode_frame` / :func:`decode_frame`), little-endian:

    u8 coder id | f32 step | u32 n | i64 x (number of coder parameters) | coded stream

Coders: ``eg`` (Exp-Golomb, best order; ``ggprior.codec.expgolomb``; its parameters come from
:mod:`ggprior.codec.registry`, which checks them on decoding) and ``ans`` (the table-driven rANS of
``ggprior.codec.rans`` under the message's own histogram, quantized integer-exactly: parameters
``qmin``, ``nsym`` and the packed table's length, then the packed table and the rANS stream). A
message whose integer range exceeds the rANS alphabet (``rans.NSYM_MAX``) is sent with ``eg`` instead.

A third frame kind, ``raw`` (:func:`encode_raw`, coder id 2, no coder parameters), carries float32
values as they are: the fallback for a bucket that cannot be coded (non-finite values, integers
beyond ``Q_MAX``). :func:`decode_frame` returns those float32 values with step 1.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from ..codec import rans, registry
from ..codec.bits import CodingError
from ..codec.histogram import histogram
from ..codec.quantizer import check_step

CODERS = {"eg": "eg", "ans": "ans-hist"}
_RANS_KEYS = ("qmin", "nsym", "table_bytes")
_IDS = {name: i for i, name in enumerate(CODERS)}
RAW_ID = len(CODERS)
Q_MAX = 1 << 30  # largest |integer| a frame carries; beyond it the bucket is sent raw
_HEAD = struct.Struct("<BfIB")
_PARAM = struct.Struct("<q")


def eg0_lengths(q: torch.Tensor) -> torch.Tensor:
    """Exp-Golomb order-0 code length (bits) of zigzag(q), elementwise, as float32 on q's device."""
    n = torch.where(q > 0, 2 * q - 1, -2 * q)
    _, e = torch.frexp((n + 1).to(torch.float64))  # 2^(e-1) <= n + 1 < 2^e, exact for n < 2^53
    return (2 * e - 1).to(torch.float32)


def rate_quantize(x: torch.Tensor, step: float, lam: float = 0.0) -> torch.Tensor:
    """Integers (int64) for ``x`` at ``step``: rounding, or the rate-constrained choice with ``lam > 0``."""
    if lam < 0:
        raise CodingError(f"rate weight lam must be >= 0, got {lam}")
    u = x.detach().to(torch.float64) / check_step(step, "gradient")  # float64, as the weight quantizer
    if not bool(torch.isfinite(u).all()):
        raise CodingError("gradient holds NaN or Inf values; cannot quantize it")
    q0 = torch.round(u)
    if lam == 0:
        return q0.to(torch.int64)
    q1 = q0 - torch.sign(q0)
    cost0 = (u - q0).square() + lam * eg0_lengths(q0)
    cost1 = (u - q1).square() + lam * eg0_lengths(q1)
    return torch.where(cost1 < cost0, q1, q0).to(torch.int64)


def warmup() -> None:
    """Load the coders' compiled kernels now (the first call in a process otherwise pays for it)."""
    q = np.arange(-3, 4)
    for coder in CODERS:
        decode_frame(encode_frame(q, 1.0, coder))


def encode_frame(q: np.ndarray, step: float, coder: str = "ans") -> bytes:
    """One message: header (coder, step, count, coder parameters) followed by the coded integers."""
    if coder not in CODERS:
        raise CodingError(f"unknown gradient coder {coder!r}; known: {', '.join(CODERS)}")
    q = np.ascontiguousarray(np.asarray(q).reshape(-1))
    if coder == "ans" and (not q.size or int(q.max()) - int(q.min()) >= rans.NSYM_MAX):
        coder = "eg"  # the rANS alphabet is bounded (a wide range is rare: a tiny step); nothing to model when empty
    if coder == "ans":
        qmin, freqs = registry.rans_table("ans-hist", histogram(q), None)
        table = rans.pack_freqs(freqs)
        stream = table + rans.encode((q - qmin).astype(np.int32), freqs)
        values = [qmin, freqs.size, len(table)]
    else:
        stream, params = registry.encode(CODERS[coder], q)
        values = [params[k] for k in registry._PARAM_KEYS[CODERS[coder]]]
    head = _HEAD.pack(_IDS[coder], check_step(step), q.size, len(values))
    return head + b"".join(_PARAM.pack(int(v)) for v in values) + stream


def encode_raw(x: np.ndarray | torch.Tensor) -> bytes:
    """A frame carrying ``x`` as float32 values, uncoded (the fallback for a bucket that cannot be coded)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float32).cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    return _HEAD.pack(RAW_ID, 1.0, a.size, 0) + a.astype("<f4", copy=False).tobytes()


def decode_frame(data: bytes | memoryview) -> tuple[np.ndarray, float]:
    """(integers, step) of a frame made by :func:`encode_frame`; :class:`CodingError` on damage.

    A raw frame (:func:`encode_raw`) gives (float32 values, 1.0).
    """
    mv = memoryview(data) if isinstance(data, memoryview) else memoryview(bytes(data))
    if len(mv) < _HEAD.size:
        raise CodingError(f"gradient frame of {len(mv)} bytes is shorter than its {_HEAD.size}-byte header")
    cid, step, n, nparams = _HEAD.unpack_from(mv)
    if cid == RAW_ID:
        if nparams != 0 or len(mv) != _HEAD.size + 4 * n:
            raise CodingError(f"raw gradient frame: {len(mv)} bytes cannot hold {n} float32 values")
        return np.frombuffer(mv[_HEAD.size:], dtype="<f4").astype(np.float32), 1.0
    if cid >= len(CODERS):
        raise CodingError(f"gradient frame names unknown coder id {cid}")
    name = list(CODERS.values())[cid]
    try:
        step = check_step(step)
    except ValueError as err:  # a damaged step: a frame error like any other
        raise CodingError(f"gradient frame: {err}") from err
    keys = _RANS_KEYS if name == "ans-hist" else registry._PARAM_KEYS[name]
    if nparams != len(keys) or len(mv) < _HEAD.size + nparams * _PARAM.size:
        raise CodingError(f"gradient frame: {nparams} coder parameters, coder {name!r} takes {len(keys)}")
    off = _HEAD.size
    params = {}
    for k in keys:
        params[k] = _PARAM.unpack_from(mv, off)[0]
        off += _PARAM.size
    if name != "ans-hist":
        return registry.decode(name, mv[off:], n, params), step
    tb = params["table_bytes"]
    if not 0 < tb <= len(mv) - off or abs(params["qmin"]) > Q_MAX:
        raise CodingError(f"gradient frame: table of {tb} bytes or qmin {params['qmin']} does not fit the frame")
    freqs, _ = rans.unpack_freqs(mv[off:off + tb], params["nsym"], rans.PROB_BITS)
    return rans.decode(mv[off + tb:], freqs, n).astype(np.int64) + params["qmin"], step
