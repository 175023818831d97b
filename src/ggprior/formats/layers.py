"""One quantized linear layer for every weight format, and converting a model's linear layers to it.

:class:`QuantLinear` holds the weight as a :class:`~.quant_tensor.QuantWeight` Parameter (codes of a
:class:`~ggprior.formats.registry.Format`, out x in, + a scale for the scaled formats; state dict keys
``weight_codes`` / ``weight_scale``) and multiplies without ever decoding the whole weight: the 8-bit
formats on CPU through the fused kernels of :mod:`.lut_kernels`, everything else (CUDA, fp16/bf16
inputs or formats, a gradient wanted for the input) by decoding blocks of rows of at most
``block_elems`` values and multiplying each in torch (:meth:`QuantLinear.reference_forward`).
:class:`RF8Linear` is the same layer in the two RF8 roundings, under its own name. :func:`to_format`
gives an embedding tied to a converted layer the same Parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .quant_tensor import BLOCK_ELEMS, FUSED_BLOCK_ELEMS, QuantWeight, fused_table, quant_linear, reference_linear
from .registry import RF8_FORMATS, RF8_MODES, Format, get_format
from .rf8 import MODES
from .surgery import is_linear, linear_weight, replace_linear_layers

_WEIGHT_KEYS = ("weight_codes", "weight_scale", "weight", "bias")


class QuantLinear(nn.Module):
    """A linear layer whose weight is a :class:`~.quant_tensor.QuantWeight` Parameter
    (``requires_grad=False``): codes + optional scale in a :class:`Format`, one byte a weight for the
    8-bit formats the whole time. ``layer.weight`` is that Parameter (``named_parameters``,
    ``get_parameter``, tied weights see it; reading it as a tensor decodes). ``state_dict``:
    ``weight_codes`` (out x in, the format's storage dtype), ``weight_scale`` (scaled formats only),
    ``bias`` (float, unquantized); ``load_state_dict`` also takes a float ``weight`` (encoded).

    Forward takes the fused path (:func:`.lut_kernels.lut_linear`: no decoded weight beyond a block
    of ``fused_block_elems`` values) for an 8-bit format on CPU with a float32 input that wants no
    gradient; otherwise :meth:`reference_forward` (decode-then-matmul, block by block). The kernels
    add the bias, except where it needs a gradient: then torch adds it, so it trains."""

    block_elems = BLOCK_ELEMS  # decoded values a block, reference path
    fused_block_elems = FUSED_BLOCK_ELEMS  # decoded values a block, fused numba path

    def __init__(self, in_features: int, out_features: int, fmt: str | Format, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        f = get_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        zero = f.quantize(torch.zeros(1, 1)).codes.reshape(-1)[0].item()  # the code of 0.0 (RF8: 0x40)
        codes = torch.full((out_features, in_features), zero, dtype=f.storage, device=device)
        scale_shape = {"none": None, "tensor": (), "channel": (out_features,)}[f.scale]
        scale = None if scale_shape is None else torch.ones(scale_shape, dtype=torch.float32, device=device)
        self.weight = nn.Parameter(QuantWeight(codes, scale, f.name), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | Format, *, name: str = "linear") -> QuantLinear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``) into a new quantized layer
        (an :class:`RF8Linear` for the RF8 formats)."""
        w, b = linear_weight(linear)
        f = get_format(fmt)
        out = make_layer(f, w.shape[1], w.shape[0], b is not None, w.device,
                         b.dtype if b is not None else torch.float32)
        out.weight = nn.Parameter(QuantWeight.from_float(w, f.name, name=f"{name}.weight"), requires_grad=False)
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    @property
    def fmt(self) -> str:
        return self._parameters["weight"].fmt

    @property
    def weight_codes(self) -> torch.Tensor:
        """The weight's codes (out x in, the format's storage dtype), the tensor the layer holds."""
        return self._parameters["weight"].codes

    @property
    def weight_scale(self) -> torch.Tensor | None:
        return self._parameters["weight"].scale

    def __setattr__(self, name: str, value: object) -> None:
        """``layer.weight = w``: a :class:`QuantWeight` (Parameter or not) of the layer's shape becomes
        the layer's weight Parameter, shared (transformers' ``tie_weights`` after :func:`to_format`
        assigns the embedding's QuantWeight Parameter to the head); any other float tensor of that
        shape is encoded into the layer's own codes, in place."""
        if name != "weight" or not isinstance(self._parameters.get("weight"), QuantWeight):
            super().__setattr__(name, value)
            return
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of a {self.out_features}x{self.in_features} {type(self).__name__}: "
                             f"expected a tensor of that shape, got {getattr(value, 'shape', type(value).__name__)}")
        if isinstance(value, QuantWeight) or (isinstance(value, nn.Parameter) and type(value.data) is not torch.Tensor):
            # a QuantWeight, or a Parameter of another subclass (FSDP2's DTensor shard of one): held as it is
            super().__setattr__(name, value if isinstance(value, nn.Parameter)
                                else nn.Parameter(value, requires_grad=False))
            return
        with torch.no_grad():
            self._parameters["weight"].copy_(value.detach().to(self.weight_codes.device))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self._parameters["weight"]
        if not isinstance(w, QuantWeight):  # held by a wrapper (an FSDP2 DTensor): saved as it is
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_codes"] = w.codes
        if w.scale is not None:
            destination[prefix + "weight_scale"] = w.scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = self._parameters["weight"]
        if not isinstance(w, QuantWeight):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        key = {k: prefix + k for k in _WEIGHT_KEYS}
        try:
            with torch.no_grad():
                if key["weight_codes"] in state_dict:
                    codes = state_dict[key["weight_codes"]]
                    if tuple(codes.shape) != tuple(w.codes.shape) or codes.dtype != w.codes.dtype:
                        raise ValueError(f"{key['weight_codes']}: {codes.dtype} {list(codes.shape)}, the layer holds "
                                         f"{w.codes.dtype} {list(w.codes.shape)}")
                    w.codes.copy_(codes)
                    if w.scale is not None:
                        if key["weight_scale"] in state_dict:
                            w.scale.copy_(state_dict[key["weight_scale"]])
                        else:
                            missing_keys.append(key["weight_scale"])
                elif key["weight"] in state_dict:
                    w.copy_(state_dict[key["weight"]])
                else:
                    missing_keys.append(key["weight_codes"])
                if self.bias is not None:
                    if key["bias"] in state_dict:
                        self.bias.copy_(state_dict[key["bias"]])
                    else:
                        missing_keys.append(key["bias"])
        except (ValueError, RuntimeError) as e:
            error_msgs.append(str(e))
        if strict:
            ours = set(key.values()) - (set() if self.bias is not None else {key["bias"]})
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours
                                   and "." not in k[len(prefix):])

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The format's 256-entry table where forward takes the fused path for ``x``, else None."""
        return fused_table(x, self._parameters["weight"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dicts directly: nn.Module.__getattr__ costs ~0.3 us an attribute, 2% of a small batch-1 call
        p = self._parameters
        return quant_linear(x, p["weight"], p.get("bias"), fused_block_elems=self.fused_block_elems,
                            block_elems=self.block_elems)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-then-matmul in torch (any device and dtype, differentiable in ``x``), in blocks of
        rows of at most ``block_elems`` decoded values."""
        return reference_linear(x, self._parameters["weight"], self.bias, self.block_elems)

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
    Embeddings and norms are left as they are, except an ``nn.Embedding`` whose weight is tied to a
    converted layer (an LM head): it gets the same :class:`~.quant_tensor.QuantWeight` Parameter
    (one copy, 1 byte a value; its forward decodes the rows it gathers), so transformers'
    ``tie_weights`` keeps them one Parameter."""
    f = get_format(fmt)
    converted: dict[int, tuple[nn.Parameter, QuantLinear]] = {}  # id(old weight) -> (old weight, its layer)

    def make(name: str, m: nn.Module) -> QuantLinear:
        q = QuantLinear.from_linear(m, f, name=name)
        if isinstance(m, nn.Linear):
            converted[id(m.weight)] = (m.weight, q)  # the old Parameter is kept alive: its id stays unique
        return q

    replace_linear_layers(model, make, skip)
    for m in model.modules():
        hit = converted.get(id(m._parameters.get("weight"))) if isinstance(m, nn.Embedding) else None
        if hit is not None and hit[0] is m.weight:
            m.weight = hit[1].weight
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
