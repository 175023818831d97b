"""A quantized weight as a tensor subclass: :class:`QuantWeight`, in the style of torchao's.

A :class:`QuantWeight` is a wrapper subclass (``torch.Tensor._make_wrapper_subclass``) whose logical
shape and dtype are those of the float weight (out x in, float32 unless moved to another float dtype)
while it holds only the inner tensors ``codes`` (the format's storage dtype: 1 byte a value for the
8-bit formats) and ``scale`` (float32, 0-d or one per row; None for the unscaled formats) and the
format's name. It can be an ``nn.Parameter`` (``requires_grad=False``), so ``named_parameters``,
``get_parameter``, tied weights (one Parameter in the embedding and the LM head) and
``torch.compile`` (``__tensor_flatten__`` / ``__tensor_unflatten__``) see it.

* ``__torch_function__``: ``F.linear`` runs :func:`quant_linear` (the fused kernels of
  :mod:`.lut_kernels` for a float32 CPU input that wants no gradient, else decode-then-matmul in
  blocks of rows); ``F.embedding`` decodes only the rows it gathers; everything else goes on to
  ``__torch_dispatch__``.
* ``__torch_dispatch__``: ``detach`` / ``alias`` (same inner tensors), ``clone``, ``_to_copy``
  (``.to(device)`` moves the inner tensors; a float dtype changes the logical dtype, the codes stay),
  ``copy_`` (from a QuantWeight of the same format: the inner tensors; from anything else: encoded).
  Any other op sees the decoded weight (:meth:`QuantWeight.dequantize`); an in-place one writes its
  result back, re-encoded. The 256-entry table is not an inner tensor: it is a constant of the
  format (:func:`.lut_kernels.lut_table`), one object the VBMI kernels cache by identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .lut_kernels import lut_linear, lut_table
from .registry import FORMATS, QTensor, get_format

aten = torch.ops.aten
_ONE = torch.ones(1, dtype=torch.float32)  # the scale of the unscaled formats
BLOCK_ELEMS = 1 << 20  # decoded values a block, reference path (large: few launches on a GPU)
FUSED_BLOCK_ELEMS = 1 << 17  # decoded values a block, fused numba path (512 KiB of float32: stays in L2)


class QuantWeight(torch.Tensor):
    """A weight held as codes (+ scale) of a :class:`~ggprior.formats.registry.Format`; reads as the
    decoded float tensor of the same shape (see the module's notes)."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    fmt: str

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor | None, fmt: str, dtype: torch.dtype = torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor | None, fmt: str, dtype: torch.dtype = torch.float32):
        self.codes, self.scale, self.fmt = codes, scale, fmt
        # plain attributes: the layer's hot path reads no tensor property (each costs a __torch_function__ call)
        self.fused_table = lut_table(fmt) if dtype == torch.float32 else None
        self.unit_scale = _ONE if scale is None else scale

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str, *, name: str = "weight") -> QuantWeight:
        """Encode the float tensor ``w`` in format ``fmt``."""
        f = get_format(fmt)
        q = f.quantize(w.detach(), name=name)
        return cls(q.codes.contiguous(), None if q.scale is None else q.scale.contiguous(), f.name)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight, a new plain tensor (``dtype``: the logical dtype unless given)."""
        codes = self.codes
        if self.scale is not None and self.scale.dim() and codes.dim() != 2:  # a reshaped view: decode by rows
            w = FORMATS[self.fmt].dequantize(QTensor(codes.reshape(self.scale.shape[0], -1), self.scale),
                                             dtype or self.dtype)
            return w.reshape(codes.shape)
        return FORMATS[self.fmt].dequantize(QTensor(codes, self.scale), dtype or self.dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded rows ``index`` (any shape of integers) -> ``index.shape + (in,)``."""
        flat = index.reshape(-1)
        scale = self.scale[flat] if self.scale is not None and self.scale.dim() else self.scale
        w = FORMATS[self.fmt].dequantize(QTensor(self.codes[flat], scale), dtype or self.dtype)
        return w.reshape(*index.shape, self.codes.shape[-1])

    def __repr__(self) -> str:
        return f"QuantWeight(fmt={self.fmt!r}, shape={tuple(self.codes.shape)}, device={self.codes.device})"

    def _stable_hash_for_caching(self) -> str:  # AOT autograd's cache key: the metadata, not the values
        scale = "none" if self.scale is None else ("row" if self.scale.dim() else "tensor")
        return f"QuantWeight({self.fmt},{self.dtype},{scale})"

    def __tensor_flatten__(self):
        return ["codes"] + ([] if self.scale is None else ["scale"]), (self.fmt, self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, meta: tuple, outer_size, outer_stride) -> QuantWeight:
        fmt, dtype = meta
        return cls(inner["codes"], inner.get("scale"), fmt, dtype)

    def _with(self, fn, dtype: torch.dtype | None = None) -> QuantWeight:
        """A QuantWeight of the same format with ``fn`` applied to each inner tensor."""
        return QuantWeight(fn(self.codes), None if self.scale is None else fn(self.scale), self.fmt,
                           dtype or self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], QuantWeight):
            return quant_linear(*args, **kwargs)
        if func is F.embedding and len(args) >= 2 and isinstance(args[1], QuantWeight) \
                and kwargs.get("max_norm") is None and (len(args) < 4 or args[3] is None):
            return args[1].rows(args[0])
        with torch._C.DisableTorchFunctionSubclass():  # no conversion of the results to QuantWeight
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._with(func)
        if func is aten.clone.default:
            return args[0]._with(lambda t: t.clone(**kwargs))
        if func is aten._to_copy.default:
            return _to_copy(args[0], kwargs)
        if func is aten.copy_.default:
            return _copy_(args[0], args[1])
        if func is aten.view.default:  # FSDP2 keeps a flat view of its shard: the codes, viewed
            return QuantWeight(args[0].codes.view(args[1]), args[0].scale, args[0].fmt, args[0].dtype)
        if func in _ROW_OPS:
            return _ROW_OPS[func](*args, **kwargs)
        return _decoded(func, args, kwargs)

    # FSDP2 all-gather extension: the shards travel as codes (+ per-row scales), 1 byte a value
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        per_row = self.scale is not None and self.scale.dim() > 0
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 pads every shard to this many rows
        codes = self.codes
        if codes.shape[0] != rows:
            if per_row:  # FSDP2 requires every all-gather input to have the padded shard's shape
                raise NotImplementedError(
                    f"FSDP2: a per-row scaled QuantWeight ({self.fmt}) shards evenly only: {outer_size[0]} rows "
                    f"over {mesh.size()} ranks")
            codes = _new_zeros(self, (rows, *codes.shape[1:])).codes
            codes[:self.codes.shape[0]] = self.codes
        inputs = (codes, self.scale) if per_row else (codes,)
        return inputs, (self.fmt, None if per_row else self.scale)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        fmt, scale = metadata
        if out is not None:  # the same inner tensors, refilled in place by FSDP
            return None
        codes = outputs[0]
        full = QuantWeight(codes, outputs[1] if len(outputs) > 1 else scale, fmt)
        return full, tuple(outputs)


def _rows_view(w: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Rows ``start:stop`` as a QuantWeight whose inner tensors view ``w``'s."""
    scale = w.scale[start:stop] if w.scale is not None and w.scale.dim() else w.scale
    return QuantWeight(w.codes[start:stop], scale, w.fmt, w.dtype)


def _split(w: QuantWeight, size: int, dim: int = 0):
    if dim != 0:
        return _decoded(aten.split.Tensor, (w, size, dim), {})
    n = w.codes.shape[0]
    return [_rows_view(w, i, min(i + size, n)) for i in range(0, n, size)]


def _slice(w: QuantWeight, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1):
    if step != 1 or dim != 0:
        return _decoded(aten.slice.Tensor, (w, dim, start, end, step), {})
    rows = range(w.codes.shape[0])[slice(start, end)]
    return _rows_view(w, rows.start, rows.stop)


def _new_zeros(w: QuantWeight, size, **kwargs):
    """Zeros of ``w``'s format (FSDP2 pads shards with them) where only the rows differ, else plain zeros."""
    size = tuple(size)
    if kwargs.get("dtype") not in (None, w.dtype) or size[1:] != tuple(w.codes.shape[1:]) or len(size) != 2:
        return torch.zeros(size, dtype=kwargs.get("dtype") or w.dtype, device=kwargs.get("device") or w.device)
    f = FORMATS[w.fmt]
    zero = f.quantize(torch.zeros(1, 1)).codes.reshape(-1)[0].item()
    codes = torch.full(size, zero, dtype=w.codes.dtype, device=w.codes.device)
    scale = None if w.scale is None else torch.ones(size[:1] if w.scale.dim() else (),
                                                    device=w.codes.device)
    return QuantWeight(codes, scale, w.fmt, w.dtype)


def _as_strided(w: QuantWeight, size, stride, storage_offset=0):
    """The first rows of ``w`` (FSDP2 cuts the all-gathered padding off this way); contiguous only."""
    size = tuple(size)
    if storage_offset or tuple(stride) != tuple(torch.empty(size, device="meta").stride()) \
            or size[1:] != tuple(w.codes.shape[1:]):
        return _decoded(aten.as_strided.default, (w, size, stride, storage_offset), {})
    return _rows_view(w, 0, size[0])


_ROW_OPS = {aten.split.Tensor: _split, aten.slice.Tensor: _slice, aten.new_zeros.default: _new_zeros,
            aten.as_strided.default: _as_strided}


def _to_copy(w: QuantWeight, kwargs: dict) -> QuantWeight:
    """``.to(device)`` moves the inner tensors; ``.to(float dtype)`` keeps the codes, changes the logical dtype."""
    dtype = kwargs.get("dtype") or w.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"a QuantWeight reads as a float tensor; cannot convert it to {dtype}")
    moved = {k: v for k, v in kwargs.items() if k in ("device", "non_blocking")}
    return w._with(lambda t: t.to(**moved) if moved else t.clone(), dtype)


def _copy_(dst: QuantWeight, src: torch.Tensor) -> QuantWeight:
    """Copy into ``dst`` in place: a QuantWeight of the same format by its inner tensors, anything else encoded."""
    if not isinstance(dst, QuantWeight):  # a float tensor written from a QuantWeight: decode
        return dst.copy_(src.dequantize(dst.dtype))
    if tuple(src.shape) != tuple(dst.codes.shape):
        raise ValueError(f"copy into a {tuple(dst.codes.shape)} QuantWeight from a tensor of shape {tuple(src.shape)}")
    if isinstance(src, QuantWeight) and src.fmt == dst.fmt:
        q = QTensor(src.codes, src.scale)
    else:
        q = FORMATS[dst.fmt].quantize(src.dequantize() if isinstance(src, QuantWeight) else src, name="weight")
    dst.codes.copy_(q.codes)
    if q.scale is not None:
        dst.scale.copy_(q.scale)
    return dst


def _decoded(func, args, kwargs):
    """Run ``func`` on the decoded weight(s); an in-place op on a QuantWeight re-encodes its result."""
    plain = tree_map(lambda t: t.dequantize() if isinstance(t, QuantWeight) else t, (args, kwargs))
    out = func(*plain[0], **plain[1])
    if func._schema.is_mutable and args and isinstance(args[0], QuantWeight):
        _copy_(args[0], plain[0][0])
        return args[0]
    return out


def fused_table(x: torch.Tensor, w: QuantWeight) -> torch.Tensor | None:
    """The format's 256-entry table where :func:`quant_linear` takes the fused path for ``x``, else None."""
    if x.dtype != torch.float32 or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return w.fused_table if w.codes.is_cpu else None


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, *,
                 fused_block_elems: int = FUSED_BLOCK_ELEMS, block_elems: int = BLOCK_ELEMS) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for a :class:`QuantWeight` ``w``: the fused kernels where
    :func:`fused_table` allows, else :func:`reference_linear`. The kernels add the bias, except
    where it needs a gradient: then torch adds it, so it trains."""
    table = fused_table(x, w)
    if table is None:
        return reference_linear(x, w, bias, block_elems)
    n_out, n_in = w.codes.shape
    trains = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    y = lut_linear(x.reshape(-1, n_in), w.codes, table, w.unit_scale, None if trains else bias,
                   max(1, fused_block_elems // max(1, n_in)))
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], n_out)
    return y + bias if trains else y


def reference_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                     block_elems: int = BLOCK_ELEMS) -> torch.Tensor:
    """Decode-then-matmul in torch (any device and dtype, differentiable in ``x``), in blocks of
    rows of at most ``block_elems`` decoded values."""
    n_out, n_in = w.codes.shape
    bias = None if bias is None else bias.to(x.dtype)
    rows = max(1, block_elems // max(1, n_in))
    if rows >= n_out:
        return F.linear(x, w.dequantize(x.dtype), bias)
    parts = []
    for i in range(0, n_out, rows):
        block = _rows_view(w, i, min(i + rows, n_out)).dequantize(x.dtype)  # views of the codes: no gather
        parts.append(F.linear(x, block, None if bias is None else bias[i:i + rows]))
    return torch.cat(parts, dim=-1)
