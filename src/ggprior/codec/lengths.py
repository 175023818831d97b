"""Model-level compression measurement (SPEC.md section 4): code lengths from histograms.

``measure(source, bits=10)`` quantizes every selected floating tensor with its own step,
builds the histogram of the integers and computes, without writing any bitstream:

==============  =====================================================================
``fl``          fixed length: ``width`` = bits covering [qmin, qmax] (= ``bits`` for a
                symmetric tensor under ``bits=``; the paper's FL = 10 reference)
``eg``          Exp-Golomb of the zigzag-mapped integers at the best order k per tensor
``eg-fixed``    Exp-Golomb at one fixed order ``eg_k`` for every tensor
``huffman``     exact Huffman code on the tensor's histogram (unrestricted lengths)
``entropy``     empirical zeroth-order entropy of the histogram (ideal, no side info)
``gg``          ideal code length -log2 P(bin) under the fitted GG (no side info)
``ans``         rANS under the fitted GG: cross-entropy of the stored frequency table + 128 bits
``ans-hist``    rANS under the histogram: cross-entropy of the stored frequency table + 128 bits
==============  =====================================================================

Side information counted per quantized tensor (bits), matching what the ``.ggz`` file
needs to decode the integers given the tensor's shape: step 32 for every coder, plus
FL: qmin 32 + width 8; EG: k 8; Huffman: qmin 32 + alphabet size 32 + 5 per symbol of the
range (the canonical length table); ans and ans-hist: range 64 + prob_bits 8 + the packed
integer frequency table (``rans.pack_freqs``), as in a version-2 file. ``entropy`` and ``gg`` are ideal
figures and carry none. Tensors sharing memory (tied weights) are counted once. Names, shapes and dtypes are not counted (every format, including
the FL reference and safetensors, needs them). Tensors left unquantized (``include``) are
counted at their original size in the whole-model figures (``model_bytes_*``, ``model_ratio_*``).

Coder names are those of :mod:`ggprior.codec.registry` (``MEASURES``); result keys spell them
with ``_`` (``bits_ans_hist``). Ratios: ``cr_<c> = bits_fl / bits_<c>`` over the quantized tensors (CR(EG) and CR(HM) of
the paper are ``cr_eg`` and ``cr_huffman``); ``ratio_dtype_<c>`` = original bits of the
quantized tensors / ``bits_<c>``; ``model_ratio_<c>`` = original model bytes / model bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..io.sources import floating_names, open_source
from . import expgolomb, fixed, ggmodel, huffman, rans
from . import quantizer as quant
from .histogram import Histogram
from .registry import IDEAL, MEASURES, best_rans_table, check_coder, column

STEP_BITS = 32
RANGE_BITS = 64
ANS_OVERHEAD_BITS = 8 * rans.HEADER_BYTES
"""The rANS stream's final states (4 x 32 bits), counted whole: they start at L = 2^16 and carry a few bits only."""


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def tensor_bits(h: Histogram, coders: Sequence[str], *, eg_k: int = 0, gg: ggmodel.GGParams | None = None) -> dict:
    """Coded size in bits (payload + side information, step excluded) of one tensor's histogram.

    Returns ``{coder: bits}`` plus ``eg_k_best`` when ``eg`` is asked for.
    """
    out: dict = {}
    n = h.n
    nsym_range = h.qmax - h.qmin + 1 if n else 1
    for c in coders:
        if c == "fl":
            out[c] = n * fixed.width_for(h.qmin, h.qmax) + 40
        elif c == "eg":
            k, b = expgolomb.best_order(h.symbols, h.counts) if n else (0, 0)
            out[c], out["eg_k_best"] = b + 8, k
        elif c == "eg-fixed":
            out[c] = expgolomb.total_bits_hist(h.symbols, h.counts, eg_k) + 8
        elif c == "huffman":
            out[c] = huffman.total_bits_hist(h) + RANGE_BITS + huffman.LEN_BITS * nsym_range
        elif c == "entropy":
            out[c] = h.entropy_bits()
        elif c == "gg":
            out[c] = ggmodel.ideal_bits(h, gg if gg is not None else ggmodel.fit(h))
        elif c in ("ans", "ans-hist"):
            out[c] = rans_bits(h, c, gg) if n else 0
        else:
            raise ValueError(f"unknown coder {c!r}; choose from {', '.join(MEASURES)}")
    return out


def rans_bits(h: Histogram, coder: str, gg: ggmodel.GGParams | None = None) -> float:
    """Bits of a ``.ggz`` (version 2) rANS tensor: cross-entropy under the integer frequency table the writer stores
    (:func:`.registry.best_rans_table`), plus the table, its range and prob_bits, and the coder's final states
    (one chunk)."""
    _, qmin, f = best_rans_table(coder, h, gg if gg is not None else ggmodel.fit(h))
    p = f[h.symbols - qmin].astype(np.float64) / float(1 << rans.PROB_BITS)
    payload = float(-(h.counts * np.log2(p)).sum())
    return payload + ANS_OVERHEAD_BITS + RANGE_BITS + 8 + 8 * len(rans.pack_freqs(f))


def _check_coders(coders: Sequence[str]) -> list[str]:
    cs = [check_coder(c, MEASURES) for c in coders]
    if "fl" not in cs:
        cs.insert(0, "fl")  # the reference of every ratio
    return cs


def measure(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    *,
    step: float | None = None,
    bits: int | None = None,
    rel_error: float | None = None,
    coders: Sequence[str] = MEASURES,
    include: str = "all",
    eg_k: int = 0,
    gg_fit: str = "moment",
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Per-tensor and whole-model code lengths of a model quantized per tensor.

    Exactly one of ``step`` (one step for every tensor), ``bits`` (per-tensor step of a
    ``bits``-bit symmetric FL quantizer) or ``rel_error`` (per-tensor step with that
    relative RMS error) may be given; none means ``rel_error=DEFAULT_REL_ERROR`` (0.005). ``include`` is ``"all"``
    (every floating tensor) or ``"matrices"`` (norms and biases kept exact). ``gg_fit`` is
    ``"moment"`` (the paper's estimator, on the histogram) or ``"ml"`` (binned maximum
    likelihood: minimises the GG code length itself; about 0.01% smaller on MiniLM, ~100x slower).

    Returns (rows, summary): one row per floating tensor (``bpw_<c>``, ``bits_<c>``,
    ``cr_eg``, ``cr_huffman``, step, range, GG parameters in weight units, relative error)
    and a flat summary over the model (see the module docstring), with a ``groups`` entry
    splitting it into ``matrices`` (ndim >= 2) and ``vectors``.
    """
    step, bits, rel_error = quant.resolve_rule(step, bits, rel_error)
    cs = _check_coders(coders)
    src = open_source(source)
    aliases = src.aliases()  # tied weights: stored and counted once
    names = [k for k in floating_names(src) if k not in aliases]
    if not names:
        raise ValueError(f"{src.label}: no floating-point tensors to measure")
    rows: list[dict] = []
    for name in tqdm(names, desc="measure", disable=not progress, leave=False):
        t = src[name]
        shape = tuple(t.shape)
        row: dict = {"name": name, "shape": "x".join(map(str, shape)) or "scalar", "ndim": len(shape),
                     "numel": t.numel(), "dtype": str(t.dtype).removeprefix("torch."), "orig_bits": t.numel() * _dtype_bits(t.dtype)}
        if t.numel() == 0 or not quant.is_included(name, shape, include):
            row["kind"] = "exact"
            rows.append(row)
            continue
        qt = quant.quantize_tensor(t, step=step, bits=bits, rel=rel_error, name=name,
                                   gg_fit=gg_fit if ("gg" in cs or "ans" in cs) else None)
        s, q, h, gg = qt.step, qt.q, qt.hist, qt.gg
        tb = tensor_bits(h, cs, eg_k=eg_k, gg=gg)
        row.update(kind="quantized", step=s, qmin=h.qmin, qmax=h.qmax, distinct=int(h.symbols.size),
                   rel_error=quant.rel_error(t, s, q))
        if gg is not None:
            row.update({f"gg_{k}": v for k, v in gg.to_weights(s).items()})
        if "eg" in cs:
            row["eg_k"] = tb.pop("eg_k_best")
        for c in cs:
            row[f"bits_{column(c)}"] = tb[c] + (0 if c in IDEAL else STEP_BITS)
            row[f"bpw_{column(c)}"] = row[f"bits_{column(c)}"] / t.numel()
        for c in map(column, cs):
            row[f"cr_{c}"] = row["bits_fl"] / row[f"bits_{c}"] if row[f"bits_{c}"] > 0 else math.inf
        rows.append(row)
    summary = summarize(rows, cs)
    summary["groups"] = {
        g: summarize([r for r in rows if (r["ndim"] >= 2) == (g == "matrices")], cs)
        for g in ("matrices", "vectors")
    }
    summary.update(source=src.label, include=include, eg_k=eg_k, gg_fit=gg_fit,
                   step_rule=quant.step_rule(step, bits, rel_error))
    return rows, summary


def summarize(rows: Sequence[dict], coders: Sequence[str]) -> dict:
    """Whole-model totals of :func:`measure` rows (flat dict; see the module docstring)."""
    coders = [column(c) for c in coders]
    qrows = [r for r in rows if r.get("kind") == "quantized"]
    exact_bits = sum(r["orig_bits"] for r in rows if r.get("kind") == "exact")
    n = sum(r["numel"] for r in qrows)
    orig_q = sum(r["orig_bits"] for r in qrows)
    out: dict = {"tensors": len(rows), "quantized_tensors": len(qrows), "weights": n,
                 "exact_tensors": len(rows) - len(qrows), "exact_bytes": exact_bits / 8,
                 "orig_bytes": (orig_q + exact_bits) / 8}
    if not qrows:
        return out
    totals = {c: float(sum(r[f"bits_{c}"] for r in qrows)) for c in coders}
    for c in coders:
        out[f"bits_{c}"] = totals[c]
        out[f"bpw_{c}"] = totals[c] / n
    for c in coders:
        out[f"cr_{c}"] = totals["fl"] / totals[c] if totals[c] > 0 else math.inf
        out[f"ratio_dtype_{c}"] = orig_q / totals[c] if totals[c] > 0 else math.inf
        out[f"model_bytes_{c}"] = (totals[c] + exact_bits) / 8
        out[f"model_ratio_{c}"] = out["orig_bytes"] / out[f"model_bytes_{c}"] if out[f"model_bytes_{c}"] else math.inf
    return out


def quantized_state_dict(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    *, step: float | None = None, bits: int | None = None, rel_error: float | None = None, include: str = "all",
) -> dict[str, torch.Tensor]:
    """The quantize-dequantize state dict (same dtypes; unselected tensors unchanged)."""
    step, bits, rel_error = quant.resolve_rule(step, bits, rel_error)
    src = open_source(source)
    out: dict[str, torch.Tensor] = {}
    for name in src:
        t = src[name]
        if t.dtype.is_floating_point and t.numel() and quant.is_included(name, tuple(t.shape), include):
            s = quant.choose_step(t, step=step, bits=bits, rel=rel_error, name=name)
            out[name] = quant.dequantize(quant.quantize(t, s, name=name), s, t.dtype)
        else:
            out[name] = t
    return out
