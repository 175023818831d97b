"""The symbol models of :mod:`.lossless`: the stored histogram's and the GG law's integer tables,
the GG fit that minimises the symbol code length, and the choice of ``k``.

A symbol (exponent + top ``k`` mantissa bits) stands for an interval of magnitudes
``[v(sym << (M-k)), v((sym+1) << (M-k)))``, so a GG law predicts its probability
``P(|X| in [lo, hi)) = G(lo, hi) + G(-hi, -lo)``. Symbols of the NaN/Inf exponent have GG mass 0
and get the floor probability inside the coded range; the GG fit uses the finite values only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..gg import fit as gg_fit
from . import ggmodel, rans
from .lossless_fields import dtype_info, values_of

P_FLOOR = 2.0**-30


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy of a histogram, in bits (all values together)."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * (np.log2(c) - math.log2(n))).sum()) if n else 0.0


def code_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Ideal code length of a histogram under an integer table (inf if a present symbol has freq 0)."""
    nz = counts > 0
    if np.any(freqs[nz] == 0):
        return math.inf
    total = float(freqs.sum())
    return float(-(counts[nz] * np.log2(freqs[nz] / total)).sum())


def gg_symbol_probs(params: tuple[float, float, float], name: str, k: int, smin: int, smax: int) -> np.ndarray:
    """GG mass of every symbol in [smin, smax] (magnitude intervals, see the module doc), float64, unnormalised."""
    _, _, _, _, m = dtype_info(name)
    s = np.arange(smin, smax + 2, dtype=np.int64) << (m - k)
    edges = values_of(s, name)
    lo, hi = edges[:-1], edges[1:]
    ok = np.isfinite(lo)
    hi = np.where(np.isfinite(hi), hi, np.inf)
    lo0 = np.where(ok, lo, 0.0)
    hi0 = np.where(ok, hi, 0.0)
    p = ggmodel.GGParams(*params)
    mass = ggmodel.interval_mass(lo0, hi0, p) + ggmodel.interval_mass(-hi0, -lo0, p)
    return np.where(ok & np.isfinite(mass), mass, 0.0)


def gg_freqs(params: tuple[float, float, float], name: str, k: int, smin: int, smax: int, prob_bits: int) -> np.ndarray:
    """The integer table of the GG model: nonzero exactly on [smin, smax] (deterministic from float32 params)."""
    _, _, _, e, _ = dtype_info(name)
    mass = gg_symbol_probs(params, name, k, smin, smax)
    tot = mass.sum()
    p = np.full(mass.size, 1.0) if not (math.isfinite(tot) and tot > 0) else mass / tot
    full = np.zeros(1 << (e + k), dtype=np.float64)
    full[smin : smax + 1] = np.maximum(p, P_FLOOR)
    return rans.quantize_freqs(full, prob_bits)


def _f32(v: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def fit_gg_model(a: np.ndarray, counts: np.ndarray, name: str, k: int, smin: int, smax: int):
    """float32 (mu, beta, gamma) minimising the symbol code length; None if no GG fits (too few finite values)."""
    x = values_of(a[:: max(1, a.size // (1 << 20))], name)
    x = x[np.isfinite(x)]
    if x.size < 2 or float(np.ptp(x)) == 0.0:
        return None
    try:
        f = gg_fit(torch.from_numpy(x))
    except ValueError:
        return None
    scale = max(abs(f.mu), f.beta, 1e-30)
    sub = counts[smin : smax + 1].astype(np.float64)

    def params(v):
        g = math.exp(min(max(v[2], math.log(0.05)), math.log(20.0)))
        return (_f32(v[0] * scale), _f32(math.exp(v[1])), _f32(g))

    def cost(v):
        prm = params(v)
        if not all(math.isfinite(t) for t in prm) or prm[1] <= 0 or prm[2] <= 0:
            return math.inf
        mass = gg_symbol_probs(prm, name, k, smin, smax)
        tot = mass.sum()
        if not (math.isfinite(tot) and tot > 0):
            return math.inf
        return float(-(sub * np.log2(np.maximum(mass / tot, P_FLOOR))).sum())

    x0 = np.array([f.mu / scale, math.log(f.beta), math.log(f.gamma)])
    best = x0
    if math.isfinite(cost(x0)):
        from scipy import optimize  # only when fitting the exponent law; keeps SciPy's optimizer out of decoding

        res = optimize.minimize(cost, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-3, "maxiter": 200})
        if res.fun <= cost(x0):
            best = res.x
    prm = params(best)
    return prm if math.isfinite(cost(best)) else None


def choose_k(hist_kmax: np.ndarray, kmax: int, n: int, m: int) -> int:
    """The ``k`` in ``0..kmax`` of the smallest estimated stream (entropy + table + raw bits)."""
    best, best_bits = 0, math.inf
    for k in range(kmax + 1):
        h = hist_kmax.reshape(-1, 1 << (kmax - k)).sum(axis=1)
        est = entropy_bits(h) + 14 * np.count_nonzero(h) + n * (1 + m - k)
        if est < best_bits - 1e-9:
            best, best_bits = k, est
    return best
