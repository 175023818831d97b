import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from ggprior import gg


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 1.0, 2.0, 4.0])
def test_moment_fit_recovers_gamma_within_2pct(gamma):
    beta = 0.05
    x = gg.sample((1_000_000,), 0.0, beta, gamma, generator=_gen(1))
    f = gg.fit(x)
    assert f.gamma == pytest.approx(gamma, rel=0.02)
    if gamma >= 0.5:
        assert f.beta == pytest.approx(beta, rel=0.02)
    assert not f.at_bound


def test_moment_beta_scatters_at_gamma_03_and_mle_fixes_it():
    x = gg.sample((1_000_000,), 0.0, 0.05, 0.3, generator=_gen(1))
    m = gg.fit(x, mle=True)
    assert m.method == "mle"
    assert m.gamma == pytest.approx(0.3, rel=0.02)
    assert m.beta == pytest.approx(0.05, rel=0.02)


def test_mle_handles_gamma_01_where_moments_fail():
    x = gg.sample((1_000_000,), 0.0, 1.0, 0.1, generator=_gen(2))
    assert abs(math.log(gg.fit(x).beta)) > math.log(1.5)  # the moment estimate of beta is far off
    m = gg.fit(x, mle=True)
    assert m.gamma == pytest.approx(0.1, rel=0.03)
    assert m.beta == pytest.approx(1.0, rel=0.05)


def test_rho_known_values_and_monotone():
    assert gg.rho(2.0) == pytest.approx(math.pi / 2)
    assert gg.rho(1.0) == pytest.approx(2.0)
    g = np.geomspace(gg.GAMMA_MIN, gg.GAMMA_MAX, 500)
    assert np.all(np.diff(gg.rho(g)) < 0)
    assert gg.rho(1e4) == pytest.approx(4 / 3, rel=1e-3)


@given(st.floats(min_value=0.06, max_value=19.0))
def test_gamma_from_ratio_inverts_rho(gamma):
    got, at_bound = gg.gamma_from_ratio(gg.rho(gamma))
    assert got == pytest.approx(gamma, rel=1e-9)
    assert not at_bound


@given(st.floats(min_value=1.0, max_value=1e6))
def test_gamma_from_ratio_scalar_path_equals_the_vectorised_one(ratio):
    got, at_bound = gg.gamma_from_ratio(ratio)
    vec, vec_bound = gg.gamma_from_ratio(np.array([ratio, 2.0]))
    assert got == pytest.approx(vec[0], rel=1e-12)
    assert at_bound == vec_bound[0]


def test_gamma_from_ratio_bounds_and_vectorised():
    assert gg.gamma_from_ratio(4 / 3) == (gg.GAMMA_MAX, True)
    assert gg.gamma_from_ratio(1.0) == (gg.GAMMA_MAX, True)
    assert gg.gamma_from_ratio(1e12) == (gg.GAMMA_MIN, True)
    g, b = gg.gamma_from_ratio(np.array([2.0, math.pi / 2, 1.2]))
    np.testing.assert_allclose(g[:2], [1.0, 2.0], rtol=1e-9)
    assert list(b) == [False, False, True]
    with pytest.raises(ValueError, match="finite"):
        gg.gamma_from_ratio(float("nan"))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_pdf_cdf_ppf_match_scipy(gamma):
    mu, beta = 0.1, 0.7
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    ref = sps.gennorm(gamma, loc=mu, scale=beta)
    np.testing.assert_allclose(gg.pdf(x, mu, beta, gamma).numpy(), ref.pdf(x.numpy()), rtol=1e-10)
    np.testing.assert_allclose(gg.cdf(x, mu, beta, gamma).numpy(), ref.cdf(x.numpy()), rtol=1e-8, atol=1e-12)
    q = torch.linspace(0.001, 0.999, 57, dtype=torch.float64)
    np.testing.assert_allclose(gg.ppf(q, mu, beta, gamma).numpy(), ref.ppf(q.numpy()), rtol=1e-8)
    assert float(gg.entropy(beta, gamma)) == pytest.approx(ref.entropy() / math.log(2), rel=1e-10)
    assert float(gg.variance(beta, gamma)) == pytest.approx(ref.var(), rel=1e-10)


def test_ppf_rejects_bad_probability():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gg.ppf(torch.tensor([1.5]))


def test_pdf_accepts_tensor_parameters_and_integrates_to_one():
    x = torch.linspace(-30, 30, 200001, dtype=torch.float64)
    gammas = torch.tensor([[0.7], [1.0], [2.5]], dtype=torch.float64)
    dens = gg.pdf(x, 0.0, 1.0, gammas)
    integral = torch.trapezoid(dens, x, dim=-1)
    torch.testing.assert_close(integral, torch.ones(3, dtype=torch.float64), rtol=2e-4, atol=0)


def test_gaussian_and_laplace_special_cases():
    x = torch.linspace(-3, 3, 31, dtype=torch.float64)
    sigma = 1.3
    torch.testing.assert_close(gg.pdf(x, 0, math.sqrt(2) * sigma, 2.0),
                               torch.from_numpy(sps.norm(0, sigma).pdf(x.numpy())))
    torch.testing.assert_close(gg.pdf(x, 0, 0.5, 1.0), torch.from_numpy(sps.laplace(0, 0.5).pdf(x.numpy())))
    assert gg.beta_from_std(sigma, 2.0) == pytest.approx(math.sqrt(2) * sigma)


def test_entropy_falls_with_beta_and_rises_with_gamma_at_fixed_beta():
    assert gg.entropy(0.05, 1.2) < gg.entropy(0.1, 1.2)
    assert gg.entropy(0.1, 1.5) < gg.entropy(0.1, 1.2)


def test_sampling_is_seeded_and_dtype_device_kept():
    a = gg.sample((1000,), 0.0, 1.0, 0.7, generator=_gen(5))
    b = gg.sample((1000,), 0.0, 1.0, 0.7, generator=_gen(5))
    assert torch.equal(a, b) and a.dtype == torch.float32
    c = gg.sample((10,), 0.0, 1.0, 0.7, dtype=torch.float64, generator=_gen(5))
    assert c.dtype == torch.float64
    with pytest.raises(ValueError, match="gamma > 0"):
        gg.sample((3,), 0.0, 1.0, 0.0)


def test_sampling_small_gamma_is_finite_in_float32():
    x = gg.sample((200_000,), 0.0, 1e-10, 0.05, generator=_gen(3))
    assert torch.isfinite(x).all()


def test_streaming_chunks_match_whole_tensor():
    x = gg.sample((300_001,), 0.2, 0.3, 1.3, generator=_gen(4), dtype=torch.float64)
    whole = gg.fit(x)
    pieces = gg.fit(list(x.split(7777)))
    lazy = gg.fit(lambda: iter(x.split(100_000)))
    for other in (pieces, lazy):
        assert other.gamma == pytest.approx(whole.gamma, rel=1e-10)
        assert other.beta == pytest.approx(whole.beta, rel=1e-10)
        assert other.mu == pytest.approx(whole.mu, rel=1e-10)
        assert other.n == whole.n


@pytest.mark.parametrize(
    "bad, msg",
    [(torch.tensor([]), "empty"), (torch.full((50,), 3.0), "constant"),
     (torch.tensor([1.0, float("nan"), 2.0]), "NaN or Inf"), (torch.tensor([1.0, float("inf")]), "NaN or Inf")],
)
def test_fit_errors_name_the_tensor(bad, msg):
    with pytest.raises(ValueError, match=f"layer.7.*{msg}|{msg}.*layer.7|layer.7: .*{msg}"):
        gg.fit(bad, name="layer.7")


def test_integer_input_is_fitted_as_float():
    x = torch.randint(-50, 50, (10000,), generator=_gen(0))
    assert gg.fit(x).n == 10000


def test_goodness_of_fit_prefers_the_true_family():
    lap = gg.sample((200_000,), 0.0, 1.0, 1.0, generator=_gen(6), dtype=torch.float64)
    gof = gg.goodness_of_fit(lap, gg.fit(lap))
    assert gof.loglik_gg > gof.loglik_gauss
    assert gof.ks_gg < gof.ks_gauss
    assert gof.ks_gg < 0.01
    gauss = torch.randn(200_000, generator=_gen(7), dtype=torch.float64)
    g2 = gg.goodness_of_fit(gauss, gg.fit(gauss))
    assert g2.loglik_gg == pytest.approx(g2.loglik_gauss, abs=1e-3)
    assert g2.loglik_gauss > g2.loglik_laplace


def test_ks_distance_matches_scipy():
    x = gg.sample((5000,), 0.0, 1.0, 1.5, generator=_gen(8), dtype=torch.float64)
    ours = gg.ks_distance(x, 0.0, 1.0, 1.5)
    ref = sps.kstest(x.numpy(), sps.gennorm(1.5).cdf).statistic
    assert ours == pytest.approx(ref, rel=1e-9)
