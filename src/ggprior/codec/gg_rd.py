"""Rate and distortion of one generalized Gaussian under a uniform (or dead-zone) quantizer
(docs/rate_distortion.md section 1): the tables :mod:`ggprior.codec.allocate` solves on.

    H(s) = entropy (bits/weight) of the GG mass of the quantizer's bins     (ideal coder's rate)
    D(s) = E[(X - Q(X))^2]                                                 (mean squared error)

exactly over the bins near the mode (partial moments from regularised incomplete gamma
functions), the far tail in its high-rate form; at high rate ``H -> h(X) - log2 s`` and
``D -> s^2 / 12``. Also the differential entropy and the Shannon lower bound of a GG.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

GRID_LOG2 = np.arange(-16.0, 8.0 + 1e-9, 1.0 / 32)  # steps / beta, log2, 32 per octave
TABLE_LOG2 = np.arange(-16.0, 8.0 + 1e-9, 1.0 / 8)  # where rd_table is evaluated (interpolated between)
MAX_BINS = 512  # beyond, the high-rate form: within 1e-6 bit and 0.04% of D of 20000 exact bins (gamma 0.2-5)
LN2 = math.log(2.0)


def _upper(s: float, x: np.ndarray) -> np.ndarray:
    return special.gammaincc(s, x)


def _mass(a: float, u: np.ndarray) -> np.ndarray:
    """Regularised incomplete gamma mass between consecutive ``u``: lower P below ``a``, upper Q above (no cancellation)."""
    lower = special.gammainc(a, u)
    upper = special.gammaincc(a, u)
    d_low = lower[1:] - lower[:-1]
    d_up = upper[:-1] - upper[1:]
    return np.where(u[1:] <= a, d_low, np.where(u[:-1] >= a, d_up, d_low))


def rd_table(gamma: float, log2_steps: np.ndarray = TABLE_LOG2, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(H bits/weight, D per weight) of GG(0, 1, gamma) quantized with steps ``2**log2_steps`` (beta units).

    Quantizer: ``q = sign(x) floor(|x|/s + 1 - threshold)``, reconstruction ``q s``
    (``threshold = 0.5``: rounding; larger: a dead zone). Bins out to ``MAX_BINS`` steps are exact
    (partial moments ``int x^k f`` from upper incomplete gamma functions, no cancellation in
    the tails); beyond that the tail is counted in its high-rate form (mass ``P``, distortion
    ``P s^2 (1/12 + (threshold - 1/2)^2)``, entropy ``-int f log2 f - P log2 s``).
    """
    g = float(gamma)
    a0 = 1.0 / g
    k = [math.gamma((m + 1) / g) / (2.0 * math.gamma(a0)) for m in range(3)]  # one side's moments' scale
    logc = math.log(g / (2.0 * math.gamma(a0)))
    xmax = special.gammainccinv(a0, 1e-17) ** a0
    H = np.empty(len(log2_steps))
    D = np.empty(len(log2_steps))
    for idx, ls in enumerate(log2_steps):
        s = 2.0**ls
        nb = int(min(MAX_BINS, math.ceil(xmax / s) + 1))
        # |x| edges: bin 0 is [0, t s), bin i >= 1 is [(i - 1 + t) s, (i + t) s)
        edges = np.concatenate([[0.0], (np.arange(nb, dtype=np.float64) + threshold) * s])
        u = edges**g
        cm = [k[m] * _mass((m + 1) / g, u) for m in range(3)]  # one side's partial moments per bin
        c = np.arange(nb, dtype=np.float64) * s  # reconstruction of bin i
        p_side = cm[0]
        d = 2.0 * (cm[2] - 2.0 * c * cm[1] + c * c * cm[0])
        p0 = 2.0 * p_side[0]
        pi = p_side[1:]  # mass of +i (and of -i)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(p0 * math.log2(p0) if p0 > 0 else 0.0) - 2.0 * np.sum(np.where(pi > 0, pi * np.log2(pi), 0.0))
        dist = float(np.clip(d, 0.0, None).sum())
        X = edges[-1]
        ptail = float(_upper(a0, X**g)) if X > 0 else 1.0
        if ptail > 0:
            # -int_{|x|>X} f ln f = -ln(c) P + (1/g) Q(1/g + 1, X^g)
            ent_nats = -logc * ptail + (1.0 / g) * float(_upper(a0 + 1.0, X**g))
            h += ent_nats / LN2 - ptail * ls
            dist += ptail * s * s * (1.0 / 12.0 + (threshold - 0.5) ** 2)  # reconstruction off the bin's centre
        H[idx] = max(h, 0.0)
        D[idx] = dist
    return H, D


_TABLES: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}


def gg_rd(gamma: float, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(H, log D) of GG(0, 1, gamma) on ``GRID_LOG2`` (cached per gamma rounded to 0.005)."""
    key = (round(float(gamma) / 0.005) * 0.005, float(threshold))
    if key not in _TABLES:
        H, D = rd_table(max(key[0], 0.05), TABLE_LOG2, threshold)
        Hf = np.interp(GRID_LOG2, TABLE_LOG2, H)
        logDf = np.interp(GRID_LOG2, TABLE_LOG2, np.log(np.maximum(D, 1e-300)))
        _TABLES[key] = (np.maximum(Hf, 0.0), logDf)
    return _TABLES[key]


def diff_entropy_bits(beta: float, gamma: float) -> float:
    """h(X) in bits of GG(mu, beta, gamma)."""
    return (1.0 / gamma - math.log(gamma / (2.0 * beta * math.gamma(1.0 / gamma)))) / LN2


def shannon_lower_bound(beta: float, gamma: float, mse: float) -> float:
    """SLB of the rate-distortion function in bits/weight: max(0, h(X) - 0.5 log2(2 pi e D))."""
    return max(0.0, diff_entropy_bits(beta, gamma) - 0.5 * math.log2(2 * math.pi * math.e * mse))
