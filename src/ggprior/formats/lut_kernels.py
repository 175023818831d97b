"""Fused decode-and-multiply for the 8-bit weight formats: ``y = x @ (table[codes] * scale)^T + bias``.

Every 8-bit format of the registry (rf8, rf8-round, rf8-authors, the four fp8 and int8) decodes a
code through a 256-entry float32 table (:func:`lut_table`, built with the format's own decoder),
times a scale per tensor or per output row. :func:`lut_linear` keeps the weight as its 1-byte codes:

* where the CPU has AVX-512 VBMI (:mod:`.lut_vbmi`, :func:`use_vbmi`): table lookups by byte
  permutes, 64 codes a step, each decoded block multiplied into up to 8 input rows at once; no
  decoded weight is ever stored;
* elsewhere, numba gathers from the 1 KiB table: one input row by :func:`_gemv` (each code read
  once, multiplied on the fly); several by :func:`_decode_rows`, which decodes ``block_rows``
  weight rows into a small float32 buffer that ``torch.addmm`` multiplies against the whole
  batch, block after block.

CPU and float32 only; :func:`~ggprior.formats.quant_tensor.quant_linear` falls back to decode-then-matmul
in torch elsewhere (CUDA, fp16/bf16 inputs, a gradient wanted for the input). Threads: the VBMI
kernels split the weight rows among ``torch.get_num_threads()`` threads, the numba kernels run on
``numba.get_num_threads()`` (:func:`ggprior.threads.configure_threads` sets both), for weights of
at least ``THREADS_MIN_ELEMS`` / ``PARALLEL_MIN_ELEMS``. Registered as the custom op ``ggprior::lut_linear``, which
``torch.compile`` keeps as one opaque call.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from numba import njit, prange

from . import lut_vbmi
from .registry import FORMATS, QTensor

PARALLEL_MIN_ELEMS = 1 << 16  # numba: below this many weights a parallel launch costs more than it saves
THREADS_MIN_ELEMS = 1 << 20  # VBMI: a thread pool's round trip (~40 us) is worth it from about here


def _gemv_py(codes: np.ndarray, table: np.ndarray, scale: np.ndarray, x: np.ndarray, bias: np.ndarray,
             out: np.ndarray) -> None:
    """out[j] = scale[j or 0] * sum_i x[i] * table[codes[j, i]] + bias[j]."""
    per_row = scale.shape[0] > 1
    for j in prange(codes.shape[0]):
        row = codes[j]
        acc = np.float32(0.0)
        for i in range(row.shape[0]):
            acc += x[i] * table[row[i]]
        out[j] = acc * scale[j if per_row else 0] + bias[j]


def _decode_rows_py(codes: np.ndarray, table: np.ndarray, scale: np.ndarray, start: int, out: np.ndarray) -> None:
    """out[r, i] = table[codes[start + r, i]] * scale[start + r or 0], for the rows of ``out``."""
    per_row = scale.shape[0] > 1
    for r in prange(out.shape[0]):
        row = codes[start + r]
        s = scale[start + r if per_row else 0]
        dst = out[r]
        for i in range(row.shape[0]):
            dst[i] = table[row[i]] * s


# one source, compiled serial and parallel (prange runs as range in the serial build)
_gemv = (njit(fastmath=True, cache=True, nogil=True)(_gemv_py),
         njit(parallel=True, fastmath=True, cache=True, nogil=True)(_gemv_py))
_decode_rows = (njit(cache=True, nogil=True)(_decode_rows_py),
                njit(parallel=True, cache=True, nogil=True)(_decode_rows_py))

_TABLES: dict[str, torch.Tensor] = {}
_VBMI = {"enabled": lut_vbmi.available()}


def use_vbmi(enabled: bool | None = None) -> bool:
    """Whether the AVX-512 VBMI kernels (:mod:`.lut_vbmi`) serve :func:`lut_linear`; ``enabled``
    switches them off (or back on where the CPU has VBMI), e.g. to test the numba gathers."""
    if enabled is not None:
        _VBMI["enabled"] = enabled and lut_vbmi.available()
    return _VBMI["enabled"]


def lut_table(fmt: str) -> torch.Tensor | None:
    """The 256 float32 values of an 8-bit format's codes (index = the code's byte, unscaled), built
    with the format's own decoder; None for the 16-bit formats."""
    if fmt in _TABLES:
        return _TABLES[fmt]
    f = FORMATS[fmt]
    if f.bits != 8:
        return None
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f.storage).reshape(256, 1)
    scale = {"none": None, "tensor": torch.ones(()), "channel": torch.ones(256)}[f.scale]
    _TABLES[fmt] = f.dequantize(QTensor(codes, scale), torch.float32).reshape(256).contiguous()
    return _TABLES[fmt]


def _parallel(elems: int) -> int:
    """1 (the parallel numba build) for a large weight where numba has several threads, else 0."""
    return int(numba.get_num_threads() > 1 and elems >= PARALLEL_MIN_ELEMS)


def _threads(elems: int) -> int:
    """Threads for the VBMI kernels: torch's intra-op count for a large weight, else 1."""
    return torch.get_num_threads() if elems >= THREADS_MIN_ELEMS else 1


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)


def _check(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    """The kernels read raw memory: refuse any argument that does not fit (``ValueError``)."""
    n_out, n_in = codes.shape
    ok = (x.dim() == 2 and x.shape[1] == n_in and x.dtype == torch.float32 and codes.element_size() == 1
          and table.dtype == torch.float32 and table.numel() == 256 and scale.dtype == torch.float32
          and scale.numel() in (1, n_out) and x.is_cpu and codes.is_cpu and table.is_cpu and scale.is_cpu
          and codes.is_contiguous() and table.is_contiguous() and scale.is_contiguous()
          and (bias is None or (bias.dtype == torch.float32 and bias.numel() == n_out and bias.is_contiguous()
                                and bias.is_cpu)))
    if not ok:
        raise ValueError(f"lut_linear: arguments do not fit: x {tuple(x.shape)} {x.dtype} {x.device}, codes "
                         f"{tuple(codes.shape)} {codes.dtype}, table {table.numel()} {table.dtype}, scale "
                         f"{scale.numel()} {scale.dtype}, bias {None if bias is None else (bias.numel(), bias.dtype)}")


def _lut_linear(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, block_rows: int) -> torch.Tensor:
    _check(x, codes, table, scale, bias)
    n_out, n_in = codes.shape
    bias = _zeros(n_out) if bias is None else bias
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    if use_vbmi():
        out = torch.empty(x.shape[0], n_out, dtype=torch.float32)
        lut_vbmi.linear(x, codes, table, scale, bias, out, _threads(codes.numel()))
        return out
    x = x.detach()
    c, t, s, b = codes.numpy(), table.numpy(), scale.reshape(-1).numpy(), bias.detach().numpy()
    par = _parallel(codes.numel())
    if x.shape[0] == 1:
        out = torch.empty(1, n_out, dtype=torch.float32)
        _gemv[par](c, t, s, x.numpy()[0], b, out.numpy()[0])
        return out
    rows = max(1, min(block_rows, n_out))
    scratch = torch.empty(rows, n_in, dtype=torch.float32)
    out_t = torch.empty(n_out, x.shape[0], dtype=torch.float32)  # y^T: a block of weight rows = a block of rows
    for start in range(0, n_out, rows):
        stop = min(start + rows, n_out)
        block = scratch[:stop - start]
        _decode_rows[par](c, t, s, start, block.numpy())
        torch.addmm(bias[start:stop, None], block, x.t(), out=out_t[start:stop])
    return out_t.t().contiguous()


_lut_linear_op = torch.library.custom_op("ggprior::lut_linear", _lut_linear, mutates_args=())


@_lut_linear_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
      block_rows: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def lut_linear(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, block_rows: int) -> torch.Tensor:
    """``x`` (N x in, float32, CPU) times the weight ``table[codes] * scale`` transposed, plus ``bias``
    -> N x out (float32). No gradient flows (the layer adds a bias that must train itself).

    ``codes``: out x in, contiguous uint8 or int8 (read as bytes); ``table``: 256 float32 values,
    contiguous, never written once used (the VBMI kernels cache its byte planes by identity);
    ``scale``: contiguous float32, one value (per tensor) or one per output row; ``bias``: float32
    of ``out`` or None; ``block_rows``: weight rows the numba path decodes at a time when N > 1.
    Arguments that do not fit raise ``ValueError``. Eager calls run the kernels directly (the
    custom op's dispatch costs ~8 us, more than a 384x384 batch-1 product takes); under
    ``torch.compile``, the custom op.
    """
    fn = _lut_linear_op if torch.compiler.is_compiling() else _lut_linear
    return fn(x.contiguous(), codes, table, scale, bias, block_rows)
