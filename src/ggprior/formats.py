"""Every weight format behind one interface: quantize, dequantize, quantized linear layers, files.

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
``scale``; a quantized layer (:class:`QuantLinear`, or :class:`~ggprior.rf8.RF8Linear` for the
two RF8 roundings) keeps them as the buffers ``weight_codes`` / ``weight_scale`` and decodes in
forward. Files are safetensors: a quantized tensor ``T`` is stored as ``T_codes`` (+ ``T_scale``)
and the string metadata key ``ggprior.quantized`` holds a JSON map ``T -> {format, shape, dtype,
layout}``; every other tensor is stored as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import rf8
from .fileio import atomic_path
from .sources import TensorSource, open_source

META_KEY = "ggprior.quantized"
QUANTIZED_FILE = "quantized.safetensors"
ALIAS_KEY = "ggprior.aliases"


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
    a = torch.where(torch.isfinite(w), w.abs(), 0.0)
    return a.amax() if dim is None else a.amax(dim=dim)


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
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


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
    return QTensor(*rf8.encode_authors(w, name=name))


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("rf8", torch.uint8, 8, "none", "RF8, truncation (the paper)", _rf8("truncate"),
           lambda c, s: rf8.decode(c)),
    Format("rf8-round", torch.uint8, 8, "none", "RF8, round to nearest", _rf8("nearest"),
           lambda c, s: rf8.decode(c)),
    Format("rf8-authors", torch.uint8, 8, "tensor", "authors' rounding, 7 levels x 18 octaves",
           _authors_encode, lambda c, s: rf8.decode_authors(c, s)),
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


def get_format(fmt: str | Format) -> Format:
    """The :class:`Format` of a name; ``ValueError`` listing the known names otherwise."""
    if isinstance(fmt, Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def quantize(w: torch.Tensor, fmt: str | Format, *, name: str = "tensor") -> QTensor:
    """Encode ``w`` in format ``fmt``."""
    return get_format(fmt).quantize(w, name=name)


def dequantize(q: QTensor, fmt: str | Format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a :class:`QTensor` of format ``fmt``."""
    return get_format(fmt).dequantize(q, dtype)


def roundtrip(w: torch.Tensor, fmt: str | Format, *, name: str = "tensor") -> torch.Tensor:
    """``w`` as format ``fmt`` represents it, in ``w``'s dtype."""
    return get_format(fmt).roundtrip(w, name=name)


# ---------------------------------------------------------------- error measures

def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - approx)^2) in dB (inf if exact)."""
    r, a = ref.detach().double(), approx.detach().to(ref.device).double()
    noise = float((r - a).pow(2).sum())
    signal = float(r.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative RMS error ||ref - approx|| / ||ref|| (0 if both vanish, inf if only ref does)."""
    r, a = ref.detach().double(), approx.detach().to(ref.device).double()
    num, den = float((r - a).norm()), float(r.norm())
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def mean_relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean of |ref - approx| / |ref| over the non-zero elements of ``ref`` (small values weigh as much as large)."""
    r, a = ref.detach().double(), approx.detach().to(ref.device).double()
    nz = r != 0
    if not bool(nz.any()):
        return 0.0
    return float(((r - a).abs()[nz] / r.abs()[nz]).mean())


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """SQNR (dB), relative RMS error, mean element relative error, and the fraction of non-zero
    values flushed to zero."""
    nz = ref != 0
    flushed = float(((approx.to(ref.device) == 0) & nz).sum()) / max(1, int(nz.sum()))
    return {"sqnr_db": sqnr_db(ref, approx), "rel_error": relative_error(ref, approx),
            "mean_rel_error": mean_relative_error(ref, approx), "flushed": flushed}


# ---------------------------------------------------------------- quantized layers

class QuantLinear(nn.Module):
    """A linear layer whose weight is held in a :class:`Format` (codes + optional scale),
    decoded to the input's dtype in forward. ``state_dict``: ``weight_codes`` (out x in, the
    format's storage dtype), ``weight_scale`` (scaled formats only), ``bias`` (float)."""

    def __init__(self, in_features: int, out_features: int, fmt: str | Format, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        f = get_format(fmt)
        self.in_features, self.out_features, self.fmt = in_features, out_features, f.name
        self.register_buffer("weight_codes", torch.zeros((out_features, in_features), dtype=f.storage,
                                                         device=device))
        scale_shape = {"none": None, "tensor": (), "channel": (out_features,)}[f.scale]
        self.register_buffer("weight_scale", None if scale_shape is None else
                             torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | Format, *, name: str = "linear") -> QuantLinear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``) into a new QuantLinear."""
        w, b = rf8.linear_weight(linear)
        f = get_format(fmt)
        out = cls(w.shape[1], w.shape[0], f, b is not None, device=w.device,
                  dtype=b.dtype if b is not None else torch.float32)
        q = f.quantize(w, name=f"{name}.weight")
        out.weight_codes.copy_(q.codes)
        if q.scale is not None:
            out.weight_scale.copy_(q.scale)
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (float32, a new tensor)."""
        return FORMATS[self.fmt].dequantize(QTensor(self.weight_codes, self.weight_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = FORMATS[self.fmt].dequantize(QTensor(self.weight_codes, self.weight_scale), x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}")


def _quant_module(fmt: Format, in_f: int, out_f: int, bias: bool, device, dtype) -> nn.Module:
    if fmt.name in RF8_MODES:
        return rf8.RF8Linear(in_f, out_f, bias, mode=RF8_MODES[fmt.name], device=device, dtype=dtype)
    return QuantLinear(in_f, out_f, fmt, bias, device=device, dtype=dtype)


def convert(model: nn.Module, fmt: str | Format,
            skip: Callable[[str], bool] | Iterable[str] | None = None) -> nn.Module:
    """Replace every linear layer of ``model`` (``nn.Linear``, transformers ``Conv1D``) by its
    quantized form in ``fmt``, in place; returns the model. RF8 formats use
    :class:`~ggprior.rf8.RF8Linear`, the others :class:`QuantLinear`."""
    f = get_format(fmt)
    if f.name in RF8_MODES:
        return rf8.to_rf8(model, RF8_MODES[f.name], skip)

    rf8.replace_linear_layers(model, lambda n, m: QuantLinear.from_linear(m, f, name=n), skip)
    return model


def layer_format(m: nn.Module) -> str | None:
    """The format name of a quantized layer, None for any other module."""
    if isinstance(m, rf8.RF8Linear):
        return "rf8" if m.mode == "truncate" else "rf8-round"
    if isinstance(m, QuantLinear):
        return m.fmt
    return None


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Name -> format of every quantized layer of ``model``."""
    return {n: f for n, m in model.named_modules() if (f := layer_format(m)) is not None}


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the linear layers (quantized or not), scales included."""
    total = 0
    for m in model.modules():
        if layer_format(m) is not None:
            total += m.weight_codes.nbytes + (0 if getattr(m, "weight_scale", None) is None else m.weight_scale.nbytes)
        elif rf8.is_linear(m):
            total += m.weight.nbytes
    return total


# ---------------------------------------------------------------- files

def _entry(fmt: Format, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> dict:
    return {"format": fmt.name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout}


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors sharing storage with an earlier one (safetensors refuses shared storage)."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in tensors.items():
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().contiguous()
    return out, aliases


def _write(tensors: dict[str, torch.Tensor], entries: dict[str, dict], path: str | os.PathLike) -> Path:
    tensors, aliases = _dedupe(tensors)
    meta = {META_KEY: json.dumps(entries, sort_keys=True), ALIAS_KEY: json.dumps(aliases, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def default_select(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """The tensors ``save_quantized`` quantizes by default: floating point with two or more dimensions."""
    return dtype.is_floating_point and len(shape) >= 2


def save_quantized(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor] | TensorSource,
    path: str | os.PathLike, fmt: str | Format, *,
    select: Callable[[str, tuple[int, ...], torch.dtype], bool] = default_select,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[dict]:
    """Quantize the selected tensors of any model source (see :func:`ggprior.sources.open_source`)
    into a safetensors file at ``path``; others are copied as they are. Returns one row per
    quantized tensor (shape, bytes before and after, SQNR, relative error)."""
    f = get_format(fmt)
    src = open_source(source)
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    rows: list[dict] = []
    for name in progress(list(src)):
        t = src[name]
        if not select(name, tuple(t.shape), t.dtype):
            out[name] = t
            continue
        for suffix in ("_codes", "_scale"):
            if name + suffix in src:
                raise ValueError(f"{src.label}: tensor {name + suffix!r} collides with the stored name of {name!r}")
        q = f.quantize(t, name=name)
        out[name + "_codes"] = q.codes
        if q.scale is not None:
            out[name + "_scale"] = q.scale
        entries[name] = _entry(f, tuple(t.shape), t.dtype, "tensor")
        stats = error_stats(t.float(), f.dequantize(q))
        rows.append({"tensor": name, "shape": "x".join(map(str, t.shape)), "format": f.name,
                     "bytes_in": t.nbytes, "bytes_out": q.codes.nbytes + (0 if q.scale is None else q.scale.nbytes),
                     **stats})
    _write(out, entries, path)
    return rows


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a (converted) model's state dict with the quantized-layer metadata to ``path``."""
    entries = {}
    for name, fmt in quantized_layers(model).items():
        m = model.get_submodule(name)
        dtype = m.bias.dtype if m.bias is not None else torch.float32
        entries[f"{name}.weight" if name else "weight"] = _entry(
            FORMATS[fmt], (m.out_features, m.in_features), dtype, "linear")
    return _write(dict(model.state_dict()), entries, path)


class QuantizedFile(NamedTuple):
    """A validated quantized safetensors file: its handle, entries and aliases."""

    path: Path
    handle: object
    entries: dict[str, dict]
    aliases: dict[str, str]

    def qtensor(self, name: str) -> QTensor:
        """The stored codes and scale of quantized tensor ``name``."""
        scale = self.handle.get_tensor(name + "_scale") if FORMATS[self.entries[name]["format"]].scale != "none" \
            else None
        return QTensor(self.handle.get_tensor(name + "_codes"), scale)

    def plain_names(self) -> list[str]:
        """Names of the tensors stored as they are."""
        stored = {n + s for n in self.entries for s in ("_codes", "_scale")}
        return [k for k in self.handle.keys() if k not in stored]


_ST_DTYPE = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def open_quantized(path: str | os.PathLike) -> QuantizedFile:
    """Open and validate a quantized safetensors file (metadata, names, dtypes and shapes are
    checked before any tensor is read); ``ValueError`` naming the file and tensor otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    try:
        h = safe_open(str(p), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: not a readable safetensors file ({e})") from e
    meta = h.metadata() or {}
    if META_KEY not in meta:
        raise ValueError(f"{p}: no {META_KEY!r} metadata; not a ggprior quantized file")
    try:
        entries = json.loads(meta[META_KEY])
        aliases = json.loads(meta.get(ALIAS_KEY, "{}"))
    except ValueError as e:
        raise ValueError(f"{p}: malformed {META_KEY!r} metadata ({e})") from e
    if not isinstance(entries, dict) or not isinstance(aliases, dict):
        raise ValueError(f"{p}: {META_KEY!r} metadata must be a JSON object")
    keys = set(h.keys())
    for name, e in entries.items():
        if not isinstance(e, dict) or e.get("format") not in FORMATS or not isinstance(e.get("shape"), list):
            raise ValueError(f"{p}: tensor {name!r}: bad entry {e!r}")
        f, shape = FORMATS[e["format"]], tuple(e["shape"])
        _expect(p, h, keys, name + "_codes", f.storage, shape)
        if f.scale == "tensor":
            _expect(p, h, keys, name + "_scale", torch.float32, ())
        elif f.scale == "channel":
            _expect(p, h, keys, name + "_scale", torch.float32, (shape[0] if shape else 1,))
    for alias, target in aliases.items():
        if target not in keys:
            raise ValueError(f"{p}: alias {alias!r} points to missing tensor {target!r}")
    return QuantizedFile(p, h, entries, aliases)


def _expect(p: Path, h, keys: set[str], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if key not in keys:
        raise ValueError(f"{p}: missing tensor {key!r}")
    sl = h.get_slice(key)
    got_dtype, got_shape = _ST_DTYPE.get(sl.get_dtype()), tuple(sl.get_shape())
    if got_dtype != dtype or got_shape != shape:
        raise ValueError(f"{p}: tensor {key!r} is {sl.get_dtype()} {list(got_shape)}, "
                         f"expected {dtype} {list(shape)}")


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized file, quantized ones decoded (to their original dtype unless
    ``dtype`` is given), under the original names; aliases restored."""
    qf = open_quantized(path)
    out = {k: qf.handle.get_tensor(k) for k in qf.plain_names()}
    for name, e in qf.entries.items():
        d = dtype or getattr(torch, e.get("dtype", "float32"), torch.float32)
        out[name] = FORMATS[e["format"]].dequantize(qf.qtensor(name), d)
    for alias, target in qf.aliases.items():
        out[alias] = out[target]
    return out


def load_model(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a quantized file into ``model`` (built with the same architecture, unconverted or
    converted), in place. Quantized weights of ``nn.Linear`` layers (and of any converted layer)
    stay quantized: the layer is replaced by an empty quantized layer and the codes are loaded
    as they are. Other quantized tensors (embeddings, GPT-2 ``Conv1D`` weights quantized by
    :func:`save_quantized`) are decoded into the model's float parameter. With ``strict``, a
    model tensor the file lacks, or a quantized tensor the model has no place for, is an error;
    other extra tensors in the file (e.g. old ``position_ids`` buffers) are ignored, as
    transformers does."""
    qf = open_quantized(path)
    state: dict[str, torch.Tensor] = {k: qf.handle.get_tensor(k) for k in qf.plain_names()}
    for name, e in qf.entries.items():
        f, shape = FORMATS[e["format"]], tuple(e["shape"])
        layer_name = name.removesuffix(".weight")
        layer = _get(model, layer_name) if name.endswith(".weight") else None
        held = _held_shape(layer, e["layout"]) if layer is not None else None
        if held is None:
            state[name] = f.dequantize(qf.qtensor(name), getattr(torch, e.get("dtype", "float32"), torch.float32))
            continue
        if held != shape:
            raise ValueError(f"{qf.path}: tensor {name!r} has shape {list(shape)}, layer {layer_name!r} is {list(held)}")
        if layer_format(layer) != f.name:
            ref = layer.bias if layer.bias is not None else next(layer.parameters(), None)
            device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
            _set(model, layer_name, _quant_module(f, shape[1], shape[0], layer.bias is not None, device, dtype))
        q = qf.qtensor(name)
        state[name + "_codes"] = q.codes
        if q.scale is not None:
            state[name + "_scale"] = q.scale
    for alias, target in qf.aliases.items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _tied_to_loaded(model, k, state)]
    lost = [k for k in unexpected if k.removesuffix("_codes").removesuffix("_scale") in qf.entries or k in qf.entries]
    if strict and (missing or lost):
        raise ValueError(f"{qf.path}: does not match the model: missing {missing[:5]}, unused quantized {lost[:5]}")
    return model


def _tied_to_loaded(model: nn.Module, key: str, state: Mapping[str, torch.Tensor]) -> bool:
    """True when parameter ``key`` is the same tensor as a parameter the file provides (a tied LM head that
    transformers' ``save_pretrained`` leaves out)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(p is params[key] and k != key and k in state for k, p in params.items())


def _held_shape(layer: nn.Module, layout: str) -> tuple[int, ...] | None:
    """(out, in) of a layer that can take a quantized weight of this layout as it is; None otherwise.
    A GPT-2 ``Conv1D`` weight quantized as a plain tensor is (in, out), so it is decoded instead."""
    if layer_format(layer) is not None or isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    if rf8.is_linear(layer) and layout == "linear":
        return tuple(rf8.linear_weight(layer)[0].shape)
    return None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def parse_select(include: str | None = None, exclude: str | None = None) -> Callable[[str, tuple, torch.dtype], bool]:
    """A tensor selector for :func:`save_quantized`: the default rule, narrowed by optional regexes on names."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ValueError(f"bad tensor-name pattern: {e}") from e

    def select(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not default_select(name, shape, dtype):
            return False
        return (inc is None or bool(inc.search(name))) and (exc is None or not exc.search(name))

    return select
