"""ggprior.train.backslash: shape estimation, the rate, the update, the callback and its baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import bag_model as _model
from conftest import toy_task as _task
from conftest import train_cfg as _cfg
from ggprior import gg
from ggprior.train import BackSlash, TrainConfig, TrainError, estimate_nu, make_rate_callback, rate, train
from ggprior.train.backslash import NU_RANGE, backslash_step_, moment_sums, rate_parameters


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0, 2.0])
def test_estimate_nu_recovers_the_gg_shape(gamma):
    gen = torch.Generator().manual_seed(0)
    x = gg.sample((200_000,), 0.0, 0.05, gamma, generator=gen)
    pooled = estimate_nu([x[:50_000], x[50_000:]])
    assert pooled.shape == (2,) and pooled[0] == pooled[1]
    assert pooled[0] == pytest.approx(gamma, rel=0.06)


def test_per_tensor_estimates_differ_and_pool_is_shared():
    gen = torch.Generator().manual_seed(1)
    a = gg.sample((100_000,), 0.0, 1.0, 0.5, generator=gen)
    b = gg.sample((100_000,), 0.0, 1.0, 2.0, generator=gen)
    per = estimate_nu([a, b], per_tensor=True)
    assert per[0] == pytest.approx(0.5, rel=0.06) and per[1] == pytest.approx(2.0, rel=0.06)
    pooled = estimate_nu([a, b])
    assert pooled[0] == pooled[1] and 0.1 <= pooled[0] <= 3.0


def test_estimate_nu_is_clamped_to_the_range():
    signs = torch.tensor([1.0, -1.0] * 500)  # ratio 1 < 4/3: beyond any GG, take the upper bound
    assert estimate_nu([signs])[0] == pytest.approx(3.0)
    sparse = torch.zeros(100_000)
    sparse[0] = 1.0  # ratio N: far beyond rho(0.1)
    assert estimate_nu([sparse])[0] == pytest.approx(0.1)
    assert estimate_nu([torch.zeros(10)], nu_range=(0.2, 2.5))[0] == pytest.approx(2.5)
    with pytest.raises(TrainError, match="no tensors"):
        estimate_nu([])


def test_rate_known_value():
    x = torch.tensor([0.0, 1.0, -2.0])
    assert float(rate([x], 1.5, eps=1.0)) == pytest.approx((1 + 2**1.5 + 3**1.5) / 3)
    assert float(rate([x[:1], x[1:]], [1.0, 2.0], eps=0.0)) == pytest.approx((0 + 1 + 4) / 3)
    with pytest.raises(TrainError, match="2 shapes for 1 tensors"):
        rate([x], [1.0, 2.0])


@settings(max_examples=30, deadline=None)
@given(nu=st.floats(0.15, 2.9), eps=st.floats(0.05, 2.0), lam=st.floats(0.01, 10.0), seed=st.integers(0, 1000))
def test_step_is_a_unit_gradient_step_on_lambda_rate(nu, eps, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    y = x[1].clone().requires_grad_(True)
    z = x[0].clone().requires_grad_(True)
    (lam * rate([z, y], nu, eps)).backward()
    stepped = [x[0].clone(), x[1].clone()]
    backslash_step_(stepped, lam, nu, eps)
    assert torch.allclose(stepped[0], x[0] - z.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(stepped[1], x[1] - y.grad, rtol=1e-12, atol=1e-15)


def test_l1_and_l2_updates_are_exact():
    x = torch.tensor([0.5, -0.25, 0.0, 2.0])
    l1 = x.clone()
    backslash_step_([l1], lam=0.4, nu=1.0, eps=1.0)
    assert torch.equal(l1, x - 0.1 * torch.sign(x))  # lam/N = 0.1, zeros stay zero
    l2 = x.clone()
    backslash_step_([l2], lam=0.4, nu=2.0, eps=0.0)
    assert torch.equal(l2, x * (1 - 0.2))  # weight decay with factor 2 lam / N


def test_rate_parameters_selects_matrices_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tie (10, 4) both ways
    names = [n for n, _ in rate_parameters(model)]
    assert names == ["0.weight"]
    assert [n for n, _ in rate_parameters(model, "all")] == ["0.weight", "1.bias"]
    with pytest.raises(TrainError, match="unknown parameter set"):
        rate_parameters(model, "norms")


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() >= 2])


def test_backslash_shrinks_with_lambda_sparsifies_when_strong_and_lambda_zero_changes_nothing():
    # The step is lam nu / N per value: on this 544-value toy model 12 steps at lam = 2 move each
    # weight by only ~0.08 (weights ~ N(0, 1)); lam = 20 moves them by ~0.5 and clusters many at 0.
    plain, zero, mild, strong = _model(), _model(), _model(), _model()
    train(plain, _task(), None, _cfg())
    train(zero, _task(), None, _cfg(), [BackSlash(0.0)])
    assert torch.equal(_weights(plain), _weights(zero))
    cb = BackSlash(2.0)
    res = train(mild, _task(), _task(32, seed=1), _cfg(), [cb])
    train(strong, _task(), None, _cfg(), [BackSlash(20.0)])
    mean_abs = [float(_weights(m).abs().mean()) for m in (plain, mild, strong)]
    assert mean_abs[0] > mean_abs[1] > mean_abs[2]
    small = lambda w: float((w.abs() < 0.05).float().mean())  # noqa: E731
    assert small(_weights(strong)) > small(_weights(plain)) + 0.3
    row = res["history"][-1]
    assert row["rate_active"] and 0.1 <= row["rate_nu_mean"] <= 3.0 and 0.1 <= row["rate_nu_fit"] <= 3.0
    assert len(cb.nu_last) == len(cb.tensors) == 2


def test_schedule_backslash_epochs_then_plain():
    cb = BackSlash(2.0, epochs=1)
    res = train(_model(), _task(), None, _cfg(epochs=3), [cb])
    assert [h["rate_active"] for h in res["history"]] == [True, False, False]
    assert res["history"][0]["rate_nu_mean"] is not None and res["history"][1]["rate_nu_mean"] is None


def test_loss_mode_adds_lambda_times_rate():
    cb = BackSlash(0.5, mode="loss", nu=1.5)
    model = _model()
    cb.on_train_begin(model, 1)
    term = cb.extra_loss(model, 1)
    assert float(term.detach()) == pytest.approx(0.5 * float(rate(cb.tensors, 1.5, 1.0).detach()))
    res = train(model, _task(), None, _cfg(epochs=1), [BackSlash(0.5, mode="loss")])
    assert res["history"][0]["extra_loss"] > 0.5  # (|x|+1)^nu >= 1 everywhere


def test_fixed_nu_baselines_and_factory():
    assert make_rate_callback("none", 1.0) is None
    bs, l1, l2 = (make_rate_callback(k, 3.0, epochs=2) for k in ("backslash", "l1", "l2"))
    assert (bs.fixed_nu, bs.eps, l1.fixed_nu, l2.fixed_nu, l2.eps, l2.epochs) == (None, 1.0, 1.0, 2.0, 0.0, 2)
    m1, m2 = _model(), _model()
    train(m1, _task(), None, _cfg(epochs=1), [l2])
    assert l2.nu_last == [2.0, 2.0]
    train(m2, _task(), None, _cfg(epochs=1))
    assert _weights(m1).norm() < _weights(m2).norm()
    with pytest.raises(TrainError, match="unknown rate"):
        make_rate_callback("l0", 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lam=-1.0), "lambda"), (dict(lam=1.0, eps=0.0), "eps must be > 0"),
     (dict(lam=1.0, nu=0.5, eps=0.0), "eps must be > 0"), (dict(lam=1.0, mode="prox"), "mode"),
     (dict(lam=1.0, nu_range=(2.0, 1.0)), "nu_range"), (dict(lam=1.0, nu=0.0), "fixed nu"),
     (dict(lam=1.0, epochs=-1), "epochs")],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(TrainError, match=match):
        BackSlash(**kwargs)


def test_resume_keeps_backslash_state(tmp_path):
    train(_model(), _task(), None, TrainConfig(epochs=1, batch_size=16, progress=False), [BackSlash(1.0)],
          out_dir=tmp_path)
    cb = BackSlash(1.0)
    train(_model(), _task(), None, TrainConfig(epochs=1, batch_size=16, progress=False), [cb], out_dir=tmp_path,
          resume=True)
    assert len(cb.nu_last) == 2 and all(0.1 <= v <= 3.0 for v in cb.nu_last)


def test_nu_table_matches_bisection_and_clamps():
    from ggprior.train.backslash import nu_from_ratio

    nus = np.geomspace(0.12, 2.9, 60)
    got = nu_from_ratio(gg.rho(nus))
    exact = gg.gamma_from_ratio(gg.rho(nus), 0.1, 3.0)[0]
    assert np.allclose(got, nus, rtol=1e-5) and np.allclose(got, exact, rtol=1e-5)
    assert nu_from_ratio(np.array([1.0, 1e9])).tolist() == [3.0, 0.1]


def test_zeros_stay_zero_under_a_fractional_shape():
    x = torch.tensor([0.0, 0.5, -0.5, 0.0])
    backslash_step_([x], lam=4.0, nu=0.5, eps=1.0)
    expected = 0.5 - 0.5 * 1.5 ** -0.5  # lam nu / N = 0.5
    assert x.tolist() == pytest.approx([0.0, expected, -expected, 0.0])


# --- proximal (soft-threshold) variant and the reference lambda ---------------------------------

def test_proximal_step_soft_thresholds_to_exact_zeros():
    from ggprior.train.backslash import backslash_prox_

    x = torch.tensor([-1.0, -0.01, 0.0, 0.005, 0.5, 2.0])
    y = x.clone()
    backslash_prox_([y], lam=0.06, nu=1.0, n=6)  # threshold c = 0.01 per value
    assert torch.equal(y, torch.tensor([-0.99, 0.0, 0.0, 0.0, 0.49, 1.99]))
    # the subgradient step moves the same amount but crosses zero instead of stopping there
    z = x.clone()
    backslash_step_([z], lam=0.06, nu=1.0, n=6)
    assert float(z[3]) == pytest.approx(-0.005) and float(z[2]) == 0.0
    # nu != 1: threshold c (|x| + eps)^(nu - 1), never past zero, same shrinkage away from it
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.1
    a, b = w.clone(), w.clone()
    backslash_prox_([a], lam=50.0, nu=0.7, eps=1.0)
    backslash_step_([b], lam=50.0, nu=0.7, eps=1.0)
    far = (b.sign() == w.sign()) & (b != 0)
    assert torch.allclose(a[far], b[far]) and bool((a[~far] == 0).all()) and int((a == 0).sum()) > 0
    assert bool((a.abs() <= w.abs()).all()) and bool((a * w >= 0).all())


def test_proximal_callback_gives_exact_zeros_where_subgradient_does_not():
    res = {}
    for update in ("subgradient", "proximal"):
        res[update] = train(_model(), _task(), None, _cfg(), [BackSlash(20.0, update=update)])
    assert res["proximal"]["history"][-1]["rate_exact_zero_frac"] > 0.05
    assert res["subgradient"]["history"][-1]["rate_exact_zero_frac"] < 0.01
    with pytest.raises(TrainError, match="update"):
        BackSlash(1.0, update="newton")
    with pytest.raises(TrainError, match="proximal"):
        BackSlash(1.0, update="proximal", mode="loss")
    assert make_rate_callback("l1", 1.0, update="proximal").update == "proximal"


def test_reference_lambda():
    from ggprior.train.backslash import reference_lambda

    assert reference_lambda(22_000_000) == 2e3
    assert reference_lambda(110_000_000, 4, match_size=True) == pytest.approx(8e3)
    assert reference_lambda(11_000_000, match_size=True) == pytest.approx(200.0)

@settings(max_examples=25, deadline=None)
@given(lam=st.floats(0.0, 50.0), eps=st.sampled_from([1.0, 0.3]), per_tensor=st.booleans(),
       gamma=st.sampled_from([0.3, 1.0, 2.0]), seed=st.integers(0, 1000))
def test_fused_adaptive_step_equals_estimate_then_reference_step(lam, eps, per_tensor, gamma, seed):
    from ggprior.train.backslash import backslash_step_reference_

    gen = torch.Generator().manual_seed(seed)
    xs = [gg.sample((n,), 0.0, 0.1, gamma, generator=gen).reshape(-1, 8) for n in (64, 200)]
    ref = [x.clone().double() for x in xs]
    before = torch.stack([x.abs().sum() for x in ref])
    from ggprior.train.backslash import nu_from_ratio

    m = np.array([[x.numel(), float(x.abs().sum()), float(x.square().sum())] for x in ref])  # float64 sums
    if not per_tensor:
        m = m.sum(0, keepdims=True)
    nu = np.broadcast_to(nu_from_ratio(m[:, 0] * m[:, 2] / m[:, 1] ** 2), (2,))
    assert np.allclose(nu, estimate_nu(ref, per_tensor), rtol=1e-4)
    backslash_step_reference_(ref, lam, nu, eps)
    sums = []
    got_nu = backslash_step_(xs, lam, None, eps, per_tensor=per_tensor, sums_out=sums)
    assert np.allclose(got_nu.numpy(), nu, rtol=1e-9)
    assert torch.allclose(sums[0], before, rtol=1e-12)
    for a, b in zip(xs, ref, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6)


def test_nu_on_the_device_matches_the_host_table():
    from ggprior.train.backslash import nu_from_ratio, nu_from_ratio_tensor

    r = np.concatenate([gg.rho(np.geomspace(0.05, 4.0, 50)), [1.0, 1e9]])
    assert np.allclose(nu_from_ratio_tensor(torch.from_numpy(r)).numpy(), nu_from_ratio(r), rtol=1e-12)
    assert nu_from_ratio_tensor(torch.tensor([float("nan"), 0.0])).tolist() == [3.0, 3.0]


def test_a_lambda_that_breaks_the_model_stops_with_the_step_and_lambda(tmp_path):
    cb = BackSlash(1e30)
    with pytest.raises(TrainError, match=r"(at step \d+.*lambda=1e\+30|lambda=1e\+30)"):
        train(_model(), _task(), None, _cfg(epochs=2), [cb], out_dir=tmp_path)

def test_step_mode_is_the_rate_step_replayed_exactly():
    """With the optimizer's step negligible (lr 1e-30), training with BackSlash must equal replaying
    estimate_nu + backslash_step_ once per step on the initial weights (was a rel=0.5 comparison)."""
    model, replay = _model(), _model()
    cb = BackSlash(2.0)
    res = train(model, _task(), None, _cfg(lr=1e-30, warmup=0.0, grad_clip=None), [cb])
    tensors = [p.detach() for _, p in rate_parameters(replay)]
    n = sum(t.numel() for t in tensors)
    for _ in range(res["steps"]):
        backslash_step_(tensors, 2.0, estimate_nu(tensors, False, NU_RANGE), 1.0, n)
    got = torch.cat([p.detach().reshape(-1) for p in cb.tensors])
    want = torch.cat([t.reshape(-1) for t in tensors])
    assert res["steps"] > 5 and float((got - want).abs().max()) <= 1e-6
    assert float((want - _weights(_model())).abs().max()) > 1e-3  # the rate step did move the weights


def test_moment_sums_are_exact_in_float64():
    """Issue 16 item 10: the sums were accumulated in float32 though documented as float64."""
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randint(0, 1 << 20, (1 << 20,), generator=g).float() * 2.0**-23  # 24-bit values near 1
    exact = x.double()
    m = moment_sums([x, torch.tensor([3e19, -3e19])])
    assert m[0, 0] == x.numel() and m[0, 1] == float(exact.abs().sum())
    assert m[0, 2] == pytest.approx(float(exact.square().sum()), rel=1e-12)  # float32: ~1e-7
    assert m[1, 2] == pytest.approx(2 * float(torch.tensor(3e19)) ** 2, rel=1e-12)  # x^2 overflows float32
