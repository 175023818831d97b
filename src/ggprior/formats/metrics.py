"""Error measures of a quantized tensor against its reference: SQNR, relative errors, flushed values."""

from __future__ import annotations

import math

import torch


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
    """SQNR (dB), relative RMS error, mean element relative error and the fraction of non-zero values
    flushed to zero, over the finite values of ``ref``; ``saturated``: how many are +-inf (every
    format stores them as its largest finite value)."""
    approx = approx.to(ref.device)
    finite = torch.isfinite(ref)
    saturated = int((~finite).sum())
    if saturated:
        ref, approx = ref[finite], approx[finite]
    nz = ref != 0
    flushed = float(((approx == 0) & nz).sum()) / max(1, int(nz.sum()))
    return {"sqnr_db": sqnr_db(ref, approx), "rel_error": relative_error(ref, approx),
            "mean_rel_error": mean_relative_error(ref, approx), "flushed": flushed, "saturated": saturated}
