"""``GeneralizedGaussian``: the GG law as a ``torch.distributions.Distribution``.

    GG(mu, beta, gamma):  f(x) = gamma / (2 beta Gamma(1/gamma)) * exp(-(|x - mu| / beta)^gamma)

Parameters broadcast like every torch distribution's. ``log_prob``, ``cdf``, ``mean``,
``variance``, ``entropy`` (in nats, as torch's distributions give it; :func:`ggprior.gg.entropy`
gives bits) and ``rsample`` are differentiable in torch; ``rsample`` draws
|x - mu| = beta * G^(1/gamma), G ~ Gamma(1/gamma, 1) (reparameterised through torch's Gamma) and
an independent random sign. ``icdf`` inverts the regularised incomplete gamma function with SciPy
in float64 (no gradient): torch has no inverse of it.
"""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch.distributions import Distribution, Gamma, constraints
from torch.distributions.utils import broadcast_all

from .math import ppf


class GeneralizedGaussian(Distribution):
    """Generalized Gaussian with location ``mu``, scale ``beta`` > 0 and shape ``gamma`` > 0.

    ``gamma = 2`` is a Normal with ``sigma = beta / sqrt(2)``, ``gamma = 1`` a Laplace with scale ``beta``.
    """

    arg_constraints = {"mu": constraints.real, "beta": constraints.positive, "gamma": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, mu, beta, gamma, validate_args: bool | None = None):
        self.mu, self.beta, self.gamma = broadcast_all(mu, beta, gamma)
        if all(isinstance(v, Number) for v in (mu, beta, gamma)):
            batch_shape = torch.Size()
        else:
            batch_shape = self.mu.size()
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GeneralizedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu, new.beta, new.gamma = (p.expand(batch_shape) for p in (self.mu, self.beta, self.gamma))
        super(GeneralizedGaussian, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def mode(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.beta**2 * torch.exp(torch.lgamma(3.0 / self.gamma) - torch.lgamma(1.0 / self.gamma))

    def _log_normalizer(self) -> torch.Tensor:
        return torch.log(self.gamma) - math.log(2.0) - torch.log(self.beta) - torch.lgamma(1.0 / self.gamma)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self._log_normalizer() - (torch.abs(value - self.mu) / self.beta) ** self.gamma

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        c = value - self.mu
        p = torch.special.gammainc(1.0 / self.gamma, (torch.abs(c) / self.beta) ** self.gamma)
        return 0.5 + 0.5 * torch.sign(c) * p

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        """Quantiles (SciPy, float64, then cast back; not differentiable)."""
        value = torch.as_tensor(value, dtype=self.mu.dtype, device=self.mu.device)
        q, mu, beta, gamma = torch.broadcast_tensors(value, self.mu, self.beta, self.gamma)
        return ppf(q.detach(), mu.detach(), beta.detach(), gamma.detach())

    def entropy(self) -> torch.Tensor:
        """Differential entropy in nats: 1/gamma - log(gamma / (2 beta Gamma(1/gamma)))."""
        return 1.0 / self.gamma - self._log_normalizer()

    def rsample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        g = Gamma(1.0 / self.gamma, torch.ones_like(self.gamma)).rsample(sample_shape)
        mag = self.beta * g ** (1.0 / self.gamma)
        sign = torch.randint(0, 2, shape, device=self.mu.device).to(self.mu.dtype) * 2.0 - 1.0
        return self.mu + sign * mag
