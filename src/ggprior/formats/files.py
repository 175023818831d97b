"""Quantized safetensors files: save, open and load models in any weight format.

A quantized tensor ``T`` is stored as ``T_codes`` (+ ``T_scale``) and the string metadata key
``ggprior.quantized`` holds a JSON map ``T -> {format, shape, dtype, layout}`` (``shape`` that of the
codes; ``"transposed": true`` when they hold ``T``'s transpose, a GPT-2 ``Conv1D`` weight); every other tensor
is stored as it is. Tensors sharing storage are stored once, the others named in
``ggprior.aliases``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_path
from ..io.sources import TensorSource, open_source
from ..io.tensors import dedupe
from .layers import layer_format, make_layer, quantized_layers
from .metrics import error_stats
from .quant_tensor import QuantWeight
from .registry import FORMATS, Format, QTensor, get_format
from .surgery import get_module, is_conv1d, is_linear, linear_weight, set_module

META_KEY = "ggprior.quantized"
QUANTIZED_FILE = "quantized.safetensors"
ALIAS_KEY = "ggprior.aliases"


def _entry(fmt: Format, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> dict:
    return {"format": fmt.name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout}


def _write(tensors: dict[str, torch.Tensor], entries: dict[str, dict], path: str | os.PathLike) -> Path:
    tensors, aliases = dedupe(tensors)
    meta = {META_KEY: json.dumps(entries, sort_keys=True), ALIAS_KEY: json.dumps(aliases, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def default_select(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """The tensors ``save_quantized`` quantizes by default: floating point with two or more dimensions."""
    return dtype.is_floating_point and len(shape) >= 2


CONV1D_MODEL_TYPES = ("gpt2",)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def conv1d_weights(source: object) -> set[str]:
    """Names of GPT-2 ``Conv1D`` weights (stored in x out) in a module, or in a HF folder whose config.json
    says ``model_type: gpt2``; empty for other sources."""
    if isinstance(source, nn.Module):
        return {f"{n}.weight" if n else "weight" for n, m in source.named_modules() if is_conv1d(m)}
    folder = Path(source) if isinstance(source, str | os.PathLike) else None
    if folder is None or not (folder / "config.json").is_file():
        return set()
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        return set()
    if model_type not in CONV1D_MODEL_TYPES:
        return set()
    return {k for k in open_source(folder) if k.endswith(CONV1D_SUFFIXES)}


def save_quantized(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor] | TensorSource,
    path: str | os.PathLike, fmt: str | Format, *,
    select: Callable[[str, tuple[int, ...], torch.dtype], bool] = default_select,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[dict]:
    """Quantize the selected tensors of any model source (see :func:`ggprior.io.open_source`)
    into a safetensors file at ``path``; others are copied as they are. GPT-2 ``Conv1D`` weights
    (:func:`conv1d_weights`) are stored transposed in per-channel formats, so int8 scales each output
    channel as the quantized layers do (entry ``"transposed": true``). Returns one row per
    quantized tensor (shape, bytes before and after, SQNR, relative error)."""
    f = get_format(fmt)
    transposed = conv1d_weights(source)
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
        flip = name in transposed and f.scale == "channel" and t.dim() == 2  # per output channel, as the layers
        q = f.quantize(t.t().contiguous() if flip else t, name=name)
        out[name + "_codes"] = q.codes
        if q.scale is not None:
            out[name + "_scale"] = q.scale
        entries[name] = _entry(f, tuple(q.codes.shape), t.dtype, "linear" if flip else "tensor")
        if flip:
            entries[name]["transposed"] = True
        back = f.dequantize(q)
        stats = error_stats(t.float(), back.t() if flip else back)
        rows.append({"tensor": name, "shape": "x".join(map(str, t.shape)), "format": f.name,
                     "bytes_in": t.nbytes, "bytes_out": q.codes.nbytes + (0 if q.scale is None else q.scale.nbytes),
                     **stats})
    _write(out, entries, path)
    return rows


def save_quantized_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a (converted) model's state dict with the quantized-layer metadata to ``path``."""
    entries = {}
    for name, fmt in quantized_layers(model).items():
        m = model.get_submodule(name)
        dtype = m.bias.dtype if m.bias is not None else torch.float32
        entries[f"{name}.weight" if name else "weight"] = _entry(
            FORMATS[fmt], (m.out_features, m.in_features), dtype, "linear")
    # a QuantWeight outside a quantized layer (an embedding tied to a converted LM head) is stored decoded
    state = {k: v.dequantize() if isinstance(v, QuantWeight) else v for k, v in model.state_dict().items()}
    return _write(state, entries, path)


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

    def close(self) -> None:
        """Close the safetensors handle (tensors already read stay valid)."""
        self.handle.__exit__(None, None, None)

    def __enter__(self) -> QuantizedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plain_names(self) -> list[str]:
        """Names of the tensors stored as they are."""
        stored = {n + s for n in self.entries for s in ("_codes", "_scale")}
        return [k for k in self.handle.keys() if k not in stored]


_ST_DTYPE = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def open_quantized(path: str | os.PathLike) -> QuantizedFile:
    """Open and validate a quantized safetensors file (metadata, names, dtypes and shapes are
    checked before any tensor is read); ``ValueError`` naming the file and tensor otherwise. Close it
    (``with open_quantized(p) as qf:``) when done."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    try:
        h = safe_open(str(p), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: not a readable safetensors file ({e})") from e
    try:
        return _validated(p, h)
    except BaseException:
        h.__exit__(None, None, None)
        raise


def _validated(p: Path, h) -> QuantizedFile:
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
    with open_quantized(path) as qf:
        out = {k: qf.handle.get_tensor(k) for k in qf.plain_names()}
        for name, e in qf.entries.items():
            d = dtype or getattr(torch, e.get("dtype", "float32"), torch.float32)
            w = FORMATS[e["format"]].dequantize(qf.qtensor(name), d)
            out[name] = w.t().contiguous() if e.get("transposed") else w
    for alias, target in qf.aliases.items():
        out[alias] = out[target]
    return out


def load_quantized_model(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a quantized file into ``model`` (built with the same architecture, unconverted or
    converted), in place. Quantized weights of ``nn.Linear`` layers (and of any converted layer)
    stay quantized: the layer is replaced by an empty quantized layer and the codes are loaded
    as they are. Other quantized tensors (embeddings, GPT-2 ``Conv1D`` weights quantized by
    :func:`save_quantized`) are decoded into the model's float parameter. With ``strict``, a
    model tensor the file lacks, or a quantized tensor the model has no place for, is an error;
    other extra tensors in the file (e.g. old ``position_ids`` buffers) are ignored, as
    transformers does."""
    with open_quantized(path) as qf:
        return _load_into(model, qf, strict)


def _load_into(model: nn.Module, qf: QuantizedFile, strict: bool) -> nn.Module:
    state: dict[str, torch.Tensor] = {k: qf.handle.get_tensor(k) for k in qf.plain_names()}
    for name, e in qf.entries.items():
        f, shape = FORMATS[e["format"]], tuple(e["shape"])
        layer_name = name.removesuffix(".weight")
        layer = get_module(model, layer_name) if name.endswith(".weight") else None
        held = _held_shape(layer, e["layout"]) if layer is not None else None
        if held is None:
            w = f.dequantize(qf.qtensor(name), getattr(torch, e.get("dtype", "float32"), torch.float32))
            state[name] = w.t().contiguous() if e.get("transposed") else w
            continue
        if held != shape:
            raise ValueError(f"{qf.path}: tensor {name!r} has shape {list(shape)}, layer {layer_name!r} is {list(held)}")
        if layer_format(layer) != f.name:
            ref = layer.bias if layer.bias is not None else next(layer.parameters(), None)
            device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
            set_module(model, layer_name, make_layer(f, shape[1], shape[0], layer.bias is not None, device, dtype))
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
    if is_linear(layer) and layout == "linear":
        return tuple(linear_weight(layer)[0].shape)
    return None


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
