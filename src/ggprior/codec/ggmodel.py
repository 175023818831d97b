"""The GG model of quantized integers: bin probabilities and a fit to a histogram.

All parameters here are in units of the quantization step: integer ``i`` stands for the
weight interval [(i - 1/2) step, (i + 1/2) step], so its probability under GG(mu, beta, gamma)
is the GG mass of [i - 1/2, i + 1/2] with mu and beta divided by the step. Tail masses use
the upper regularized incomplete gamma function (no cancellation far from mu).

The fit starts from the moment-ratio estimate (``ggd.gamma_from_ratio``) on the histogram
and refines (mu, beta, gamma) by maximum likelihood of the binned data, i.e. it minimises
the ideal GG code length itself; both use only the histogram, so they are fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

from ..gg.math import GAMMA_MAX, GAMMA_MIN, beta_from_std, gamma_from_ratio
from .histogram import Histogram

P_FLOOR = 2.0**-32


@dataclass(frozen=True)
class GGParams:
    """GG parameters in step units (``mu``, ``beta``) with shape ``gamma``."""

    mu: float
    beta: float
    gamma: float

    def as_float32(self) -> GGParams:
        """The parameters rounded to float32 (what a file stores: 96 bits of side information)."""
        return GGParams(*(float(np.float32(v)) for v in (self.mu, self.beta, self.gamma)))

    def to_weights(self, step: float) -> dict:
        """mu and beta in weight units, for reports."""
        return {"mu": self.mu * step, "beta": self.beta * step, "gamma": self.gamma}


def interval_mass(a: np.ndarray, b: np.ndarray, p: GGParams) -> np.ndarray:
    """GG mass of the intervals [a, b] (step units, float64), accurate in both tails."""
    a, b = np.asarray(a, dtype=np.float64) - p.mu, np.asarray(b, dtype=np.float64) - p.mu
    s = 1.0 / p.gamma

    def tail(d: np.ndarray) -> np.ndarray:  # P(X - mu beyond |d| on its side)
        return 0.5 * special.gammaincc(s, (np.abs(d) / p.beta) ** p.gamma)

    ta, tb = tail(a), tail(b)
    return np.where(a >= 0, ta - tb, np.where(b <= 0, tb - ta, 1.0 - ta - tb)).clip(min=0.0)


def bin_probs(qmin: int, qmax: int, p: GGParams) -> np.ndarray:
    """GG mass of each integer bin [i - 1/2, i + 1/2] for i in [qmin, qmax] (float64, unnormalised)."""
    i = np.arange(qmin, qmax + 1, dtype=np.float64)
    return interval_mass(i - 0.5, i + 0.5, p)


def range_probs(qmin: int, qmax: int, p: GGParams) -> np.ndarray:
    """Bin probabilities renormalised over [qmin, qmax] and floored at ``P_FLOOR``."""
    m = bin_probs(qmin, qmax, p)
    tot = m.sum()
    if not np.isfinite(tot) or tot <= 0.0:
        m = np.ones_like(m)
        tot = m.size
    return np.maximum(m / tot, P_FLOOR)


def ideal_bits(hist: Histogram, p: GGParams) -> float:
    """Ideal code length in bits, -sum c log2 P(bin), under ``p`` renormalised over the histogram's range.

    Evaluated at the distinct values only (the range's total mass in closed form), so the
    cost grows with the number of distinct values, not with the range.
    """
    if hist.n == 0:
        return 0.0
    x = hist.symbols.astype(np.float64)
    m = interval_mass(x - 0.5, x + 0.5, p)
    tot = float(interval_mass(np.array([hist.qmin - 0.5]), np.array([hist.qmax + 0.5]), p)[0])
    if not math.isfinite(tot) or tot <= 0.0:
        return float(hist.n * math.log2(hist.qmax - hist.qmin + 1))
    return float(-(hist.counts * np.log2(np.maximum(m / tot, P_FLOOR))).sum())


def moment_fit(hist: Histogram) -> GGParams:
    """Moment-ratio GG estimate from a histogram (step units); a constant histogram gets a narrow peak."""
    c = hist.counts.astype(np.float64)
    x = hist.symbols.astype(np.float64)
    n = c.sum()
    if n == 0:
        return GGParams(0.0, 1.0, 2.0)
    mu = float((c * x).sum() / n)
    d = x - mu
    m1, m2 = float((c * np.abs(d)).sum() / n), float((c * d * d).sum() / n)
    if m2 <= 0.0 or m1 <= 0.0:
        return GGParams(mu, 0.25, 2.0)
    gamma, _ = gamma_from_ratio(m2 / (m1 * m1))
    return GGParams(mu, float(beta_from_std(math.sqrt(m2), gamma)), float(gamma))


def fit(hist: Histogram, method: str = "ml") -> GGParams:
    """Fit GG parameters (step units) to a histogram: ``"moment"`` or ``"ml"`` (binned likelihood)."""
    start = moment_fit(hist)
    if method == "moment" or hist.symbols.size < 2:
        return start
    if method != "ml":
        raise ValueError(f"GG fit method must be 'moment' or 'ml', got {method!r}")
    lo_g, hi_g = math.log(GAMMA_MIN), math.log(GAMMA_MAX)
    scale = max(start.beta, 1.0)

    def cost(v: np.ndarray) -> float:
        g = math.exp(min(max(v[2], lo_g), hi_g))
        return ideal_bits(hist, GGParams(float(v[0]) * scale, math.exp(v[1]), g))

    x0 = np.array([start.mu / scale, math.log(max(start.beta, 1e-3)), math.log(start.gamma)])
    res = optimize.minimize(cost, x0, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-2, "maxiter": 150})
    best = res.x if res.fun <= cost(x0) else x0
    g = math.exp(min(max(best[2], lo_g), hi_g))
    return GGParams(float(best[0]) * scale, math.exp(best[1]), g)
