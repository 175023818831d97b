"""One quantized linear layer for every weight format, and converting a model's linear layers to it.

:class:`QuantLinear` holds the weight in a :class:`~ggprior.formats.registry.Format` as the buffers
``weight_codes`` (out x in, the format's storage dtype) and ``weight_scale`` (scaled formats only),
and multiplies without ever decoding the whole weight: the 8-bit formats on CPU through the fused
kernels of :mod:`.lut_kernels`, everything else (CUDA, fp16/bf16 inputs or formats, a gradient
wanted for the input) by decoding blocks of rows of at most ``block_elems`` values and multiplying
each in torch (:meth:`QuantLinear.reference_forward`). :class:`RF8Linear` is the same layer in the
two RF8 roundings, under its own name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .lut_kernels import lut_linear, lut_table
from .registry import FORMATS, RF8_FORMATS, RF8_MODES, Format, QTensor, get_format
from .rf8 import MODES
from .surgery import is_linear, linear_weight, replace_linear_layers

_ONE = torch.ones(1, dtype=torch.float32)  # the scale of the unscaled formats


class QuantLinear(nn.Module):
    """A linear layer whose weight is held in a :class:`Format` (codes + optional scale), one byte a
    weight for the 8-bit formats the whole time. ``state_dict``: ``weight_codes`` (out x in, the
    format's storage dtype), ``weight_scale`` (scaled formats only), ``bias`` (float, unquantized).

    Forward takes the fused path (:func:`.lut_kernels.lut_linear`: no decoded weight beyond a block
    of ``fused_block_elems`` values) for an 8-bit format on CPU with a float32 input that wants no
    gradient; otherwise :meth:`reference_forward` (decode-then-matmul, block by block). The kernels
    add the bias, except where it needs a gradient: then torch adds it, so it trains."""

    block_elems = 1 << 20  # decoded values a block, reference path (large: few launches on a GPU)
    fused_block_elems = 1 << 17  # decoded values a block, fused path (512 KiB of float32: stays in L2)

    def __init__(self, in_features: int, out_features: int, fmt: str | Format, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        f = get_format(fmt)
        self.in_features, self.out_features, self.fmt = in_features, out_features, f.name
        zero = f.quantize(torch.zeros(1, 1)).codes.reshape(-1)[0].item()  # the code of 0.0 (RF8: 0x40)
        self.register_buffer("weight_codes", torch.full((out_features, in_features), zero, dtype=f.storage,
                                                        device=device))
        scale_shape = {"none": None, "tensor": (), "channel": (out_features,)}[f.scale]
        self.register_buffer("weight_scale", None if scale_shape is None else
                             torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | Format, *, name: str = "linear") -> QuantLinear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``) into a new quantized layer
        (an :class:`RF8Linear` for the RF8 formats)."""
        w, b = linear_weight(linear)
        f = get_format(fmt)
        out = make_layer(f, w.shape[1], w.shape[0], b is not None, w.device,
                         b.dtype if b is not None else torch.float32)
        q = f.quantize(w, name=f"{name}.weight")
        out.weight_codes.copy_(q.codes)
        if q.scale is not None:
            out.weight_scale.copy_(q.scale)
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    def _decode(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        scale = self.weight_scale
        if scale is not None and scale.dim():
            scale = scale[rows]
        return FORMATS[self.fmt].dequantize(QTensor(self.weight_codes[rows], scale), dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (float32, a new tensor). Assigning a float tensor of the layer's shape
        re-quantizes it into the codes: see :meth:`__setattr__`."""
        return self._decode(slice(None), torch.float32)

    def __setattr__(self, name: str, value: object) -> None:
        """``layer.weight = w`` (``w`` a float tensor or Parameter, out x in) encodes ``w`` into
        ``weight_codes`` / ``weight_scale``, so that transformers' ``tie_weights`` (which assigns the
        embedding's Parameter to the head) works on a converted model. The layer keeps its own
        codes: a copy of the tied weight at that moment, not a shared tensor."""
        if name != "weight":
            super().__setattr__(name, value)
            return
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of a {self.out_features}x{self.in_features} {type(self).__name__}: "
                             f"expected a tensor of that shape, got {getattr(value, 'shape', type(value).__name__)}")
        q = FORMATS[self.fmt].quantize(value.detach().to(self.weight_codes.device), name="weight")
        self.weight_codes.copy_(q.codes)
        if q.scale is not None:
            self.weight_scale.copy_(q.scale)

    def _block_rows(self, elems: int) -> int:
        return max(1, elems // max(1, self.in_features))

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The format's 256-entry table where forward takes the fused path for ``x``, else None."""
        if x.dtype != torch.float32 or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None
        return lut_table(self.fmt) if self._buffers["weight_codes"].is_cpu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._fused(x)
        if table is None:
            return self.reference_forward(x)
        # the dicts directly: nn.Module.__getattr__ costs ~0.3 us an attribute, 2% of a small batch-1 call
        scale, bias = self._buffers["weight_scale"], self._parameters.get("bias")
        trains = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        y = lut_linear(x.reshape(-1, self.in_features), self._buffers["weight_codes"], table,
                       _ONE if scale is None else scale,
                       None if trains else bias, self._block_rows(self.fused_block_elems))
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y + bias if trains else y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-then-matmul in torch (any device and dtype, differentiable in ``x``), in blocks of
        rows of at most ``block_elems`` decoded values."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = self._block_rows(self.block_elems)
        if rows >= self.out_features:
            return F.linear(x, self._decode(slice(None), x.dtype), bias)
        parts = []
        for i in range(0, self.out_features, rows):
            w = self._decode(slice(i, i + rows), x.dtype)
            parts.append(F.linear(x, w, None if bias is None else bias[i:i + rows]))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}")


class RF8Linear(QuantLinear):
    """:class:`QuantLinear` in RF8: one byte a weight; ``mode`` is ``"truncate"`` (format ``rf8``) or
    ``"nearest"`` (``rf8-round``). The decoded weight is exact in fp32, fp16 and bf16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "truncate",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if mode not in MODES:
            raise ValueError(f"unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
        super().__init__(in_features, out_features, RF8_FORMATS[mode], bias, device=device, dtype=dtype)

    @property
    def mode(self) -> str:
        return RF8_MODES[self.fmt]

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str = "truncate", *, name: str = "linear") -> RF8Linear:
        """Encode an ``nn.Linear`` (or a transformers ``Conv1D``) into a new RF8Linear."""
        if mode not in MODES:
            raise ValueError(f"unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
        return QuantLinear.from_linear(linear, RF8_FORMATS[mode], name=name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def make_layer(fmt: str | Format, in_features: int, out_features: int, bias: bool, device=None,
               dtype: torch.dtype = torch.float32) -> QuantLinear:
    """An empty quantized layer of ``fmt`` (an :class:`RF8Linear` for the RF8 formats)."""
    f = get_format(fmt)
    if f.name in RF8_MODES:
        return RF8Linear(in_features, out_features, bias, mode=RF8_MODES[f.name], device=device, dtype=dtype)
    return QuantLinear(in_features, out_features, f, bias, device=device, dtype=dtype)


def to_format(model: nn.Module, fmt: str | Format,
              skip: Callable[[str], bool] | Iterable[str] | None = None) -> nn.Module:
    """Replace every linear layer of ``model`` (``nn.Linear``, transformers ``Conv1D``) by its
    quantized form in ``fmt`` (:class:`QuantLinear`; :class:`RF8Linear` for RF8), in place;
    returns the model. ``skip`` is a predicate on layer names or a collection of names to keep.
    Embeddings and norms are left as they are. A weight tied to an embedding (an LM head) is
    quantized in the head only; the embedding keeps its float copy."""
    f = get_format(fmt)
    replace_linear_layers(model, lambda n, m: QuantLinear.from_linear(m, f, name=n), skip)
    return model


def layer_format(m: nn.Module) -> str | None:
    """The format name of a quantized layer, None for any other module."""
    return m.fmt if isinstance(m, QuantLinear) else None


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Name -> format of every quantized layer of ``model``."""
    return {n: f for n, m in model.named_modules() if (f := layer_format(m)) is not None}


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the linear layers (quantized or not), scales included."""
    total = 0
    for m in model.modules():
        if layer_format(m) is not None:
            total += m.weight_codes.nbytes + (0 if getattr(m, "weight_scale", None) is None else m.weight_scale.nbytes)
        elif is_linear(m):
            total += m.weight.nbytes
    return total


def to_rf8(model: nn.Module, mode: str = "truncate",
           skip: Callable[[str], bool] | Iterable[str] | None = None) -> nn.Module:
    """Convert every linear layer of ``model`` (BERT, GPT-2 ``Conv1D``, LLaMA, ...) to :class:`RF8Linear`
    in place and return the model: :func:`to_format` with ``rf8`` (``mode="truncate"``) or
    ``rf8-round`` (``"nearest"``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
    return to_format(model, RF8_FORMATS[mode], skip)
