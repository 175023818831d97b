"""Generalized-Gaussian distribution (GGD) math on tensors.

    f(x; mu, beta, gamma) = gamma / (2 beta Gamma(1/gamma)) * exp(-(|x - mu| / beta)^gamma)

gamma = 2 is a Gaussian (beta = sqrt(2) sigma), gamma = 1 a Laplacian. Parameters may be
Python floats or tensors (broadcast against ``x``). Everything runs on the device of ``x``.

The moment ratio rho(gamma) = Gamma(1/gamma) Gamma(3/gamma) / Gamma(2/gamma)^2 and its inverse
(:func:`gamma_from_ratio`) live here too; fitting is :mod:`ggprior.gg.fit`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

GAMMA_MIN = 0.05
GAMMA_MAX = 20.0
RHO_LIMIT = 4.0 / 3.0
LOG2E = 1.0 / math.log(2.0)

Param = float | torch.Tensor


def _as(p: Param, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(p, dtype=like.dtype, device=like.device)


def _lgamma(v: Param) -> Param:
    return torch.lgamma(v) if isinstance(v, torch.Tensor) else math.lgamma(v)


def log_normalizer(beta: Param, gamma: Param) -> Param:
    """log(gamma / (2 beta Gamma(1/gamma))), the log of the density at the mode."""
    if isinstance(beta, torch.Tensor) or isinstance(gamma, torch.Tensor):
        beta, gamma = torch.as_tensor(beta), torch.as_tensor(gamma)
        return torch.log(gamma) - math.log(2.0) - torch.log(beta) - torch.lgamma(1.0 / gamma)
    return math.log(gamma) - math.log(2.0) - math.log(beta) - math.lgamma(1.0 / gamma)


def logpdf(x: torch.Tensor, mu: Param = 0.0, beta: Param = 1.0, gamma: Param = 2.0) -> torch.Tensor:
    """Log density of GG(mu, beta, gamma) at ``x``."""
    mu, beta, gamma = _as(mu, x), _as(beta, x), _as(gamma, x)
    return log_normalizer(beta, gamma) - (torch.abs(x - mu) / beta) ** gamma


def pdf(x: torch.Tensor, mu: Param = 0.0, beta: Param = 1.0, gamma: Param = 2.0) -> torch.Tensor:
    """Density of GG(mu, beta, gamma) at ``x``."""
    return torch.exp(logpdf(x, mu, beta, gamma))


def cdf(x: torch.Tensor, mu: Param = 0.0, beta: Param = 1.0, gamma: Param = 2.0) -> torch.Tensor:
    """Distribution function: 1/2 + sign(x - mu)/2 * P(1/gamma, (|x - mu|/beta)^gamma)."""
    mu, beta, gamma = _as(mu, x), _as(beta, x), _as(gamma, x)
    c = x - mu
    p = torch.special.gammainc(1.0 / gamma, (torch.abs(c) / beta) ** gamma)
    return 0.5 + 0.5 * torch.sign(c) * p


def ppf(q: torch.Tensor, mu: Param = 0.0, beta: Param = 1.0, gamma: Param = 2.0) -> torch.Tensor:
    """Quantile function (inverse of :func:`cdf`); q in [0, 1]. Computed with SciPy in float64."""
    if torch.any((q < 0) | (q > 1)):
        raise ValueError("ppf: probabilities must lie in [0, 1]")
    qn = q.detach().to("cpu", torch.float64).numpy()
    mu_n, beta_n, gamma_n = (torch.as_tensor(p, dtype=torch.float64).cpu().numpy() for p in (mu, beta, gamma))
    g = special.gammaincinv(1.0 / gamma_n, np.abs(2.0 * qn - 1.0))
    out = mu_n + np.sign(qn - 0.5) * beta_n * g ** (1.0 / gamma_n)
    return torch.from_numpy(np.asarray(out)).to(q.device, q.dtype)


def sample(
    shape: tuple[int, ...] | torch.Size,
    mu: float = 0.0,
    beta: float = 1.0,
    gamma: float = 2.0,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw GG(mu, beta, gamma) samples: |x - mu| = beta * G^(1/gamma), G ~ Gamma(1/gamma, 1).

    Drawn in float64 and in log space (exp(log beta + log G / gamma)), so small gamma
    (heavy tails, e.g. gamma = 0.1) neither overflows nor underflows before the final cast.
    """
    if not (gamma > 0 and beta > 0):
        raise ValueError(f"sample: need beta > 0 and gamma > 0, got beta={beta}, gamma={gamma}")
    if generator is not None:
        device = generator.device
    alpha = torch.full(tuple(shape), 1.0 / gamma, dtype=torch.float64, device=device)
    g = torch._standard_gamma(alpha, generator=generator)
    mag = torch.exp(math.log(beta) + torch.log(g) / gamma)
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=device, dtype=torch.int8)
    return (mu + mag * (2.0 * bits.to(torch.float64) - 1.0)).to(dtype)


def variance(beta: Param, gamma: Param) -> Param:
    """Variance beta^2 Gamma(3/gamma) / Gamma(1/gamma)."""
    if isinstance(beta, torch.Tensor) or isinstance(gamma, torch.Tensor):
        beta, gamma = torch.as_tensor(beta), torch.as_tensor(gamma)
        return beta**2 * torch.exp(torch.lgamma(3.0 / gamma) - torch.lgamma(1.0 / gamma))
    return beta**2 * math.exp(math.lgamma(3.0 / gamma) - math.lgamma(1.0 / gamma))


def beta_from_std(std: Param, gamma: Param) -> Param:
    """The beta giving standard deviation ``std`` at shape ``gamma``."""
    if isinstance(std, torch.Tensor) or isinstance(gamma, torch.Tensor):
        std, gamma = torch.as_tensor(std), torch.as_tensor(gamma)
        return std * torch.exp(0.5 * (torch.lgamma(1.0 / gamma) - torch.lgamma(3.0 / gamma)))
    return std * math.exp(0.5 * (math.lgamma(1.0 / gamma) - math.lgamma(3.0 / gamma)))


def entropy(beta: Param, gamma: Param) -> Param:
    """Differential entropy in bits: (1/gamma - ln(gamma / (2 beta Gamma(1/gamma)))) / ln 2."""
    return (1.0 / gamma - log_normalizer(beta, gamma)) * LOG2E


def rho(gamma: np.ndarray | float) -> np.ndarray | float:
    """The moment ratio Gamma(1/g) Gamma(3/g) / Gamma(2/g)^2 (vectorised, NumPy)."""
    g = np.asarray(gamma, dtype=np.float64)
    out = np.exp(special.gammaln(1.0 / g) + special.gammaln(3.0 / g) - 2.0 * special.gammaln(2.0 / g))
    return out if out.ndim else float(out)


def gamma_from_ratio(
    ratio: np.ndarray | float, lo: float = GAMMA_MIN, hi: float = GAMMA_MAX
) -> tuple[np.ndarray | float, np.ndarray | bool]:
    """Solve rho(gamma) = ratio for gamma in [lo, hi] (vectorised bisection on log gamma).

    Returns (gamma, at_bound): ratios beyond rho(lo) give lo, ratios at or below rho(hi)
    (including everything <= 4/3) give hi; at_bound flags both.
    """
    r = np.asarray(ratio, dtype=np.float64)
    if np.any(~np.isfinite(r)):
        raise ValueError("gamma_from_ratio: ratio must be finite")
    if r.ndim == 0:
        return _gamma_from_ratio_scalar(float(r), lo, hi)
    a = np.full(r.shape, math.log(lo))
    b = np.full(r.shape, math.log(hi))
    for _ in range(64):
        m = 0.5 * (a + b)
        above = rho(np.exp(m)) > r  # rho decreasing: rho(m) > r means the root is right of m
        a = np.where(above, m, a)
        b = np.where(above, b, m)
    g = np.exp(0.5 * (a + b))
    low_bound = r >= rho(lo)
    high_bound = r <= rho(hi)
    g = np.where(low_bound, lo, np.where(high_bound, hi, g))
    return g, low_bound | high_bound


def _rho_scalar(g: float) -> float:
    return math.exp(math.lgamma(1.0 / g) + math.lgamma(3.0 / g) - 2.0 * math.lgamma(2.0 / g))


def _gamma_from_ratio_scalar(r: float, lo: float, hi: float) -> tuple[float, bool]:
    """The same bisection for one ratio with ``math.lgamma`` (15x faster than NumPy on a scalar)."""
    if r >= _rho_scalar(lo):
        return lo, True
    if r <= _rho_scalar(hi):
        return hi, True
    a, b = math.log(lo), math.log(hi)
    for _ in range(64):
        m = 0.5 * (a + b)
        if _rho_scalar(math.exp(m)) > r:
            a = m
        else:
            b = m
    return math.exp(0.5 * (a + b)), False
