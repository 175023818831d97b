"""Fitting a GG to data: moment ratio, maximum-likelihood refinement, goodness of fit.

The fit is the moment-ratio estimator of Sharifi & Leon-Garcia (1995):
rho(gamma) = Gamma(1/gamma) Gamma(3/gamma) / Gamma(2/gamma)^2 = E[c^2] / E[|c|]^2, c = x - mu,
solved by bisection on log(gamma) over [GAMMA_MIN, GAMMA_MAX] to machine precision. rho falls
strictly from +inf (gamma -> 0) to 4/3 (gamma -> inf, the uniform law; SPEC.md's "1.2" is a
typo). A ratio outside rho's range over the interval returns the nearest bound with
``at_bound=True``. Sums are accumulated in float64 over chunks, so data larger than memory
(a memory-mapped safetensors file) can be fitted in two passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from scipy import optimize

from .math import GAMMA_MAX, GAMMA_MIN, beta_from_std, cdf, entropy, gamma_from_ratio, logpdf, variance

Chunks = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


@dataclass
class GGFit:
    """A fitted GG: parameters plus the sufficient statistics they came from."""

    mu: float
    beta: float
    gamma: float
    n: int
    std: float
    ratio: float
    at_bound: bool = False
    method: str = "moment"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def variance(self) -> float:
        return float(variance(self.beta, self.gamma))

    @property
    def entropy_bits(self) -> float:
        """Differential entropy in bits of the fitted law."""
        return float(entropy(self.beta, self.gamma))


def _chunk_iter(data: Chunks) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
    elif callable(data):
        yield from data()
    else:
        yield from data


def _check_chunk(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    return t.detach().reshape(-1)


def _check_finite(total: float, name: str) -> float:
    """A float64 sum of float32/16 values is finite exactly when every value is: no separate pass."""
    if not math.isfinite(total):
        raise ValueError(f"{name}: contains NaN or Inf values; cannot fit a GG")
    return total


def centred_sums(x: torch.Tensor, centre: float) -> tuple[float, float]:
    """``sum |x - centre|`` and ``sum (x - centre)^2`` of one flat chunk, in float64.

    The moment kernel of every two-pass fit (pools of tensors, activation/gradient hooks,
    :func:`fit`): the one-pass numba kernel :func:`ggprior.gg.moments.centred_sums` for CPU
    tensors (no float64 copy of the chunk), :func:`centred_sums_reference` for others.
    """
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return centred_sums_reference(x, centre)
    from .moments import centred_sums as kernel  # imports numba; moments imports this module

    return kernel(x, centre)


def value_sum(x: torch.Tensor) -> float:
    """``sum(x)`` of one flat chunk in float64 (pass 1 of :func:`fit`): the numba kernel for CPU
    tensors (vectorised, no float64 copy), torch for others."""
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return float(x.sum(dtype=torch.float64))
    from .moments import value_sum as kernel

    return kernel(x)


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def centred_sums_reference(x: torch.Tensor, centre: float) -> tuple[float, float]:
    """:func:`centred_sums` in torch (float64 copy, then two reductions): the tests' oracle, and
    the path for tensors on an accelerator."""
    c = x.to(torch.float64) - centre
    return float(torch.linalg.vector_norm(c, 1)), float(torch.dot(c, c))


class MomentAccumulator:
    """Streaming float64 sums for the moment-ratio fit, over any number of chunks.

    Pass 1 (:meth:`add`) accumulates n and sum(x); pass 2 (:meth:`add_centered`) accumulates
    sum(|x - mu|) and sum((x - mu)^2) around the pass-1 mean, which avoids the cancellation of
    raw power sums. ``fit()`` turns them into a :class:`GGFit`.
    """

    def __init__(self, name: str = "tensor"):
        self.name = name
        self.n = 0
        self.s1 = 0.0
        self.abs_dev = 0.0
        self.sq_dev = 0.0
        self.n2 = 0

    def add(self, x: torch.Tensor) -> None:
        x = _check_chunk(x, self.name)
        self.n += x.numel()
        self.s1 += _check_finite(value_sum(x), self.name)

    def add_sums(self, n: int, s1: float) -> None:
        """Pass 1 from a member's own count and sum (a pool of tensors already summed)."""
        self.n += n
        self.s1 += s1

    @property
    def mean(self) -> float:
        if self.n == 0:
            raise ValueError(f"{self.name}: empty input; cannot fit a GG")
        return self.s1 / self.n

    def add_centered(self, x: torch.Tensor, mu: float | None = None) -> None:
        x = _check_chunk(x, self.name)
        if not x.numel():
            return
        a, q = centred_sums(x, self.mean if mu is None else mu)
        self.abs_dev += _check_finite(a, self.name)
        self.sq_dev += _check_finite(q, self.name)
        self.n2 += x.numel()

    def fit(self) -> GGFit:
        if self.n == 0:
            raise ValueError(f"{self.name}: empty input; cannot fit a GG")
        if self.n2 != self.n:
            raise RuntimeError(f"{self.name}: second pass saw {self.n2} values, first pass {self.n}")
        m1, m2 = self.abs_dev / self.n, self.sq_dev / self.n
        if m2 <= 0.0:
            raise ValueError(f"{self.name}: constant input (all values equal {self.mean:g}); cannot fit a GG")
        ratio = m2 / (m1 * m1)
        gamma, at_bound = gamma_from_ratio(ratio)
        std = math.sqrt(m2)
        return GGFit(
            mu=self.mean, beta=float(beta_from_std(std, gamma)), gamma=float(gamma), n=self.n,
            std=std, ratio=ratio, at_bound=bool(at_bound),
        )


def fit(data: Chunks, *, name: str = "tensor", mle: bool = False, chunk_size: int = 1 << 24) -> GGFit:
    """Fit GG(mu, beta, gamma) to a tensor or to chunks of one, by moment ratio.

    ``data`` is a tensor, an iterable of tensors that can be iterated twice (a list), or a
    zero-argument callable returning a fresh iterator (for streaming from disk). With
    ``mle=True`` the shape and scale are refined by maximum likelihood (mu kept), which is
    much more accurate than the moment estimate for heavy tails (gamma < 0.5).
    Raises ValueError naming ``name`` for empty, constant, NaN or Inf input.
    """
    if isinstance(data, torch.Tensor):
        flat = data.detach().reshape(-1)
        pieces = list(flat.split(chunk_size)) if flat.numel() else []
        data = pieces
    elif not callable(data):
        data = list(data)
    acc = MomentAccumulator(name)
    for c in _chunk_iter(data):
        acc.add(c)
    for c in _chunk_iter(data):
        acc.add_centered(c)
    result = acc.fit()
    if mle:
        result = refine_mle(data, result, name=name)
    return result


def _median(data: Chunks, n: int, max_values: int = 1 << 22) -> float:
    """Median of the data, or of an evenly strided subsample of about ``max_values`` values."""
    stride = max(1, n // max_values)
    parts = [c.detach().reshape(-1)[::stride].to(torch.float64) for c in _chunk_iter(data)]
    return float(torch.cat(parts).median())


def refine_mle(data: Chunks, start: GGFit, *, name: str = "tensor") -> GGFit:
    """Maximum-likelihood refinement of (mu, beta, gamma).

    mu is re-estimated by the median: the sample mean of a heavy-tailed GG (gamma < 0.5) is
    far too noisy, and a shifted centre wrecks the likelihood of the sharp peak. For a given
    gamma the MLE of beta is closed-form, beta^gamma = gamma/n * sum|c|^gamma, so the profile
    log-likelihood is maximised over log(gamma) alone (bounded scalar search around the
    moment estimate). One pass over the data per evaluation.
    """
    n = start.n
    mu = _median(data, n)

    def mean_pow(g: float) -> float:
        tot = 0.0
        for c in _chunk_iter(data):
            c = _check_chunk(c, name).to(torch.float64)
            tot += float((torch.abs(c - mu) ** g).sum())
        return tot / n

    def neg_profile(log_g: float) -> float:
        g = math.exp(log_g)
        s = mean_pow(g)
        if s <= 0.0:
            return math.inf
        beta = (g * s) ** (1.0 / g)
        return -(math.log(g) - math.log(2.0) - math.log(beta) - math.lgamma(1.0 / g) - 1.0 / g)

    lg = math.log(start.gamma)
    lo, hi = max(math.log(GAMMA_MIN), lg - 1.5), min(math.log(GAMMA_MAX), lg + 1.5)
    res = optimize.minimize_scalar(neg_profile, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    g = float(math.exp(res.x))
    beta = (g * mean_pow(g)) ** (1.0 / g)
    return GGFit(
        mu=mu, beta=beta, gamma=g, n=n, std=start.std, ratio=start.ratio,
        at_bound=g <= GAMMA_MIN * 1.0001 or g >= GAMMA_MAX * 0.9999, method="mle",
    )


def mean_loglik(x: torch.Tensor, mu: float, beta: float, gamma: float) -> float:
    """Mean log-likelihood (nats per value) of ``x`` under GG(mu, beta, gamma), in float64."""
    x = x.detach().reshape(-1).to(torch.float64)
    return float(logpdf(x, mu, beta, gamma).mean())


def _ks_sorted(xs: torch.Tensor, mu: float, beta: float, gamma: float) -> float:
    n = xs.numel()
    f = cdf(xs, mu, beta, gamma)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=xs.device)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def ks_distance(x: torch.Tensor, mu: float, beta: float, gamma: float) -> float:
    """Kolmogorov-Smirnov distance between the empirical law of ``x`` and GG(mu, beta, gamma)."""
    xs = torch.sort(x.detach().reshape(-1).to(torch.float64)).values
    if xs.numel() == 0:
        raise ValueError("ks_distance: empty input")
    return _ks_sorted(xs, mu, beta, gamma)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: on a busy machine, intra-op threads cost more than they save on
    the 10^4-10^5 values of a goodness-of-fit sample (about 6x the CPU time with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GoodnessOfFit:
    """Mean log-likelihood per value (nats) and KS distance for GG, Gaussian and Laplacian fits."""

    loglik_gg: float
    loglik_gauss: float
    loglik_laplace: float
    ks_gg: float
    ks_gauss: float
    ks_laplace: float

    def to_dict(self) -> dict:
        return asdict(self)


def goodness_of_fit(x: torch.Tensor, gg: GGFit) -> GoodnessOfFit:
    """Compare the GG fit against the Gaussian and Laplacian MLE fits on the same values.

    Gaussian: mu = mean, sigma = std (beta = sqrt(2) sigma). Laplacian: mu = median,
    b = mean |x - median| (its MLE).
    """
    with _one_thread():
        xs = torch.sort(x.detach().reshape(-1).to(torch.float64)).values  # sorted once for the three KS distances
        mean, std = float(xs.mean()), float(xs.std(unbiased=False))
        if std == 0.0:
            raise ValueError("goodness_of_fit: constant input")
        med = float(xs[(xs.numel() - 1) // 2])  # the lower median, as torch.median
        b = float((xs - med).abs().mean())
        laws = {"gg": (gg.mu, gg.beta, gg.gamma), "gauss": (mean, math.sqrt(2.0) * std, 2.0), "laplace": (med, b, 1.0)}
        return GoodnessOfFit(**{f"loglik_{k}": mean_loglik(xs, *p) for k, p in laws.items()},
                             **{f"ks_{k}": _ks_sorted(xs, *p) for k, p in laws.items()})
