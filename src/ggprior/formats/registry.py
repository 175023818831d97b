"""The registry of weight formats: one :class:`Format` per name, encode and decode.

=================  ========================================  ==============================
name               stored as                                 scale
=================  ========================================  ==============================
rf8                uint8 RF8 codes, truncation (the paper)   none
rf8-round          uint8 RF8 codes, round to nearest         none
rf8-authors        uint8, the authors' rounding variant      per tensor, a power of two
fp16               float16, saturating at +-65504            none
bf16               bfloat16, saturating at its finite max    none
fp8-e4m3           uint8 bits of float8_e4m3fn (+-448)       none (as the paper seems to use)
fp8-e5m2           uint8 bits of float8_e5m2 (+-57344)       none
fp8-e4m3-scaled    as fp8-e4m3                               per tensor: amax / 448
fp8-e5m2-scaled    as fp8-e5m2                               per tensor: amax / 57344
int8               int8, symmetric, round to nearest         per output channel (row): amax / 127
=================  ========================================  ==============================

Every format saturates out-of-range values and infinities and refuses NaN with a
``ValueError`` naming the tensor. A quantized tensor is ``codes`` plus an optional float32
``scale`` (:class:`QTensor`). Layers: :mod:`ggprior.formats.layers`; files:
:mod:`ggprior.formats.files`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import rf8
from .rf8_analysis import decode_authors, encode_authors


class QTensor(NamedTuple):
    """A quantized tensor: storage codes and an optional float32 scale (0-d or one per row)."""

    codes: torch.Tensor
    scale: torch.Tensor | None


@dataclass(frozen=True)
class Format:
    """One weight format: how a float tensor becomes codes (+ scale) and back."""

    name: str
    storage: torch.dtype
    bits: int
    scale: str  # "none", "tensor" or "channel"
    description: str
    encode: Callable[[torch.Tensor, str], QTensor]
    decode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> QTensor:
        """Encode ``w`` (any floating dtype, any device); ``name`` appears in errors."""
        _check(w, name)
        return self.encode(w.detach(), name)

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode to ``dtype`` on the codes' device."""
        return self.decode(q.codes, q.scale).to(dtype)

    def roundtrip(self, w: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """``dequantize(quantize(w))`` in ``w``'s dtype."""
        return self.dequantize(self.quantize(w, name=name), w.dtype)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Bits to store a tensor of ``shape``, scales included."""
        n = math.prod(shape)
        scales = {"none": 0, "tensor": 1, "channel": shape[0] if shape else 1}[self.scale]
        return n * self.bits + 32 * scales


def _check(w: torch.Tensor, name: str) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if bool(torch.isnan(w).any()):
        raise ValueError(f"{name}: {int(torch.isnan(w).sum())} NaN value(s) of {w.numel()}; no format codes NaN")


def _finite_amax(w: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |finite value| (over ``dim``, or all); 0 for an empty tensor or reduction."""
    a = torch.where(torch.isfinite(w), w.abs(), 0.0)
    if dim is None:
        return a.amax() if a.numel() else a.new_zeros(())
    return a.amax(dim=dim) if a.shape[dim] else a.new_zeros(a.shape[:dim] + a.shape[dim + 1:])


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """A scale of 1 where ``scale`` is 0 (an all-zero tensor, or a maximum so small that max / levels underflows)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _rf8(mode: str) -> Callable[[torch.Tensor, str], QTensor]:
    return lambda w, name: QTensor(rf8.encode(w, mode, name=name), None)


def _cast(dtype: torch.dtype) -> Callable[[torch.Tensor, str], QTensor]:
    fmax = torch.finfo(dtype).max

    def enc(w: torch.Tensor, name: str) -> QTensor:
        c = w.to(torch.float32).clamp(-fmax, fmax).to(dtype)
        return QTensor(c.view(torch.uint8) if dtype.itemsize == 1 else c, None)

    return enc


def _cast_decode(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    def dec(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        v = (codes.view(dtype) if codes.dtype == torch.uint8 else codes).to(torch.float32)
        return v if scale is None else v * scale.to(v.device)

    return dec


def _fp8_scaled(dtype: torch.dtype) -> Callable[[torch.Tensor, str], QTensor]:
    fmax = torch.finfo(dtype).max

    def enc(w: torch.Tensor, name: str) -> QTensor:
        w = w.to(torch.float32)
        amax = _finite_amax(w)
        scale = _positive(amax / fmax)
        c = (w.clamp(-amax, amax) / scale).clamp(-fmax, fmax).to(dtype)
        return QTensor(c.view(torch.uint8), scale.reshape(()))

    return enc


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() >= 2 else t.reshape(1, -1)


def _int8_encode(w: torch.Tensor, name: str) -> QTensor:
    rows = _rows(w.to(torch.float32))
    amax = _finite_amax(rows, dim=1)
    scale = _positive(amax / 127.0)
    rows = torch.maximum(torch.minimum(rows, amax[:, None]), -amax[:, None])
    c = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return QTensor(c.view(w.shape), scale)


def _int8_decode(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return (_rows(codes).to(torch.float32) * scale.to(codes.device)[:, None]).view(codes.shape)


def _authors_encode(w: torch.Tensor, name: str) -> QTensor:
    return QTensor(*encode_authors(w, name=name))


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("rf8", torch.uint8, 8, "none", "RF8, truncation (the paper)", _rf8("truncate"),
           lambda c, s: rf8.decode(c)),
    Format("rf8-round", torch.uint8, 8, "none", "RF8, round to nearest", _rf8("nearest"),
           lambda c, s: rf8.decode(c)),
    Format("rf8-authors", torch.uint8, 8, "tensor", "authors' rounding, 7 levels x 18 octaves",
           _authors_encode, lambda c, s: decode_authors(c, s)),
    Format("fp16", torch.float16, 16, "none", "IEEE half", _cast(torch.float16), _cast_decode(torch.float16)),
    Format("bf16", torch.bfloat16, 16, "none", "bfloat16", _cast(torch.bfloat16), _cast_decode(torch.bfloat16)),
    Format("fp8-e4m3", torch.uint8, 8, "none", "FP8 E4M3 (fn), unscaled", _cast(torch.float8_e4m3fn),
           _cast_decode(torch.float8_e4m3fn)),
    Format("fp8-e5m2", torch.uint8, 8, "none", "FP8 E5M2, unscaled", _cast(torch.float8_e5m2),
           _cast_decode(torch.float8_e5m2)),
    Format("fp8-e4m3-scaled", torch.uint8, 8, "tensor", "FP8 E4M3, per-tensor scale",
           _fp8_scaled(torch.float8_e4m3fn), _cast_decode(torch.float8_e4m3fn)),
    Format("fp8-e5m2-scaled", torch.uint8, 8, "tensor", "FP8 E5M2, per-tensor scale",
           _fp8_scaled(torch.float8_e5m2), _cast_decode(torch.float8_e5m2)),
    Format("int8", torch.int8, 8, "channel", "int8, symmetric, per output channel", _int8_encode, _int8_decode),
)}
RF8_MODES = {"rf8": "truncate", "rf8-round": "nearest"}
RF8_FORMATS = {mode: name for name, mode in RF8_MODES.items()}


def get_format(fmt: str | Format) -> Format:
    """The :class:`Format` of a name; ``ValueError`` listing the known names otherwise."""
    if isinstance(fmt, Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def encode(w: torch.Tensor, fmt: str | Format, *, name: str = "tensor") -> QTensor:
    """Encode ``w`` in format ``fmt``."""
    return get_format(fmt).quantize(w, name=name)


def decode(q: QTensor, fmt: str | Format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a :class:`QTensor` of format ``fmt``."""
    return get_format(fmt).dequantize(q, dtype)


def roundtrip(w: torch.Tensor, fmt: str | Format, *, name: str = "tensor") -> torch.Tensor:
    """``w`` as format ``fmt`` represents it, in ``w``'s dtype."""
    return get_format(fmt).roundtrip(w, name=name)
