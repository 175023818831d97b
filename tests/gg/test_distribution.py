"""ggprior.gg.GeneralizedGaussian against scipy.stats.gennorm: density, cdf, quantiles, moments, entropy, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import constraints

from ggprior import gg
from ggprior.gg import GeneralizedGaussian

PARAMS = [(0.0, 1.0, 2.0), (0.3, 0.05, 1.2), (-1.0, 2.0, 0.5), (0.0, 0.7, 8.0)]


def _ref(mu, beta, gamma):
    return stats.gennorm(gamma, loc=mu, scale=beta)


@pytest.mark.parametrize("mu, beta, gamma", PARAMS)
def test_matches_scipy_gennorm(mu, beta, gamma):
    d = GeneralizedGaussian(torch.tensor(mu, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
                            torch.tensor(gamma, dtype=torch.float64))
    ref = _ref(mu, beta, gamma)
    x = torch.linspace(mu - 4 * beta, mu + 4 * beta, 41, dtype=torch.float64)
    np.testing.assert_allclose(d.log_prob(x).numpy(), ref.logpdf(x.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.cdf(x).numpy(), ref.cdf(x.numpy()), rtol=1e-9, atol=1e-12)
    q = torch.tensor([1e-4, 0.1, 0.5, 0.75, 0.999], dtype=torch.float64)
    np.testing.assert_allclose(d.icdf(q).numpy(), ref.ppf(q.numpy()), rtol=1e-9, atol=1e-12)
    assert float(d.mean) == pytest.approx(ref.mean(), abs=1e-12)
    assert float(d.variance) == pytest.approx(ref.var(), rel=1e-10)
    assert float(d.entropy()) == pytest.approx(ref.entropy(), rel=1e-10)
    assert float(d.entropy()) / math.log(2) == pytest.approx(float(gg.entropy(beta, gamma)), rel=1e-10)


def test_samples_follow_the_law_and_rsample_has_gradients():
    torch.manual_seed(0)
    beta = torch.tensor(0.5, requires_grad=True)
    d = GeneralizedGaussian(0.1, beta, 1.3)
    x = d.rsample((20000,))
    assert x.shape == (20000,)
    ks = stats.kstest(x.detach().numpy(), _ref(0.1, 0.5, 1.3).cdf).statistic
    assert ks < 0.015
    x.abs().mean().backward()
    assert beta.grad is not None and float(beta.grad) > 0  # a wider law gives larger magnitudes
    assert d.sample((3, 2)).shape == (3, 2) and not d.sample((2,)).requires_grad


def test_batch_shapes_constraints_and_validation():
    d = GeneralizedGaussian(torch.zeros(3), torch.ones(3), torch.tensor([0.5, 1.0, 2.0]))
    assert d.batch_shape == (3,) and d.event_shape == ()
    assert d.log_prob(torch.zeros(3)).shape == (3,)
    assert d.rsample((4,)).shape == (4, 3)
    e = d.expand((2, 3))
    assert e.batch_shape == (2, 3) and e.sample().shape == (2, 3)
    assert d.support is constraints.real and set(d.arg_constraints) == {"mu", "beta", "gamma"}
    with pytest.raises(ValueError):
        GeneralizedGaussian(0.0, -1.0, 2.0, validate_args=True)
    with pytest.raises(ValueError):
        GeneralizedGaussian(0.0, 1.0, 0.0, validate_args=True)


def test_gamma_two_is_a_normal_and_one_a_laplace():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    d = GeneralizedGaussian(0.0, math.sqrt(2.0), 2.0)
    torch.testing.assert_close(d.log_prob(x), normal.log_prob(x))
    lap = torch.distributions.Laplace(0.0, 0.7)
    torch.testing.assert_close(GeneralizedGaussian(0.0, 0.7, 1.0).log_prob(x), lap.log_prob(x))
