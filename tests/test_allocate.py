"""codec/allocate: GG rate-distortion tables, target size met by the real code lengths, better than uniform steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ggprior
import ggprior.gg
from ggprior.codec import allocate as A
from ggprior.codec import gg_rd
from ggprior.codec.sensitivity import sensitivity_weights

# (gamma, beta, sensitivity weight): tensors that differ in shape, scale and importance
SPECS = [(0.5, 0.002, 1.0), (1.0, 0.02, 4.0), (1.5, 0.05, 0.25), (2.0, 0.03, 1.0), (0.8, 0.01, 10.0)]


@pytest.fixture(scope="module")
def synthetic():
    tens = {f"t{i}": ggprior.gg.sample((64, 256), beta=b, gamma=g, generator=torch.Generator().manual_seed(i))
            for i, (g, b, _) in enumerate(SPECS)}
    weights = {f"t{i}": s[2] for i, s in enumerate(SPECS)}
    return tens, weights


def _real_bits(tens, steps, threshold=0.5):
    n = sum(t.numel() for t in tens.values())
    return sum(A.real_bits(t, steps[k], k, threshold) for k, t in tens.items()) / n


def _wsse(tens, weights, steps, threshold=0.5):
    return sum(weights[k] * float(((A.dequantize(A.quantize(t, steps[k], threshold), steps[k]) - t) ** 2).sum())
               for k, t in tens.items())


def _match(tens, target_real, step_of):
    """Bisection on a scalar c so that steps ``step_of(c)`` give the real size ``target_real``."""
    lo, hi = -24.0, 4.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if _real_bits(tens, step_of(2.0**mid)) > target_real:
            lo = mid
        else:
            hi = mid
    return step_of(2.0**hi)


def test_high_rate_limits():
    for g in (0.5, 1.0, 2.0):
        ls = np.array([-9.0, -8.0])
        H, D = A.rd_table(g, ls)
        s = 2.0**ls
        np.testing.assert_allclose(D, s * s / 12, rtol=2e-3)
        np.testing.assert_allclose(H, A.diff_entropy_bits(1.0, g) - ls, atol=2e-3)


def test_low_rate_limits_and_monotone():
    H, D = A.rd_table(1.0, np.array([6.0, 7.0]))
    assert np.all(H < 1e-3)
    np.testing.assert_allclose(D, 2.0, rtol=1e-3)  # variance of GG(0, 1, 1)
    H, logD = A.gg_rd(1.3)
    assert np.all(np.diff(H) <= 1e-12) and np.all(np.diff(logD) >= -1e-12)


def test_dead_zone_table_matches_monte_carlo():
    x = ggprior.gg.sample((400_000,), beta=1.0, gamma=0.8, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 0.8):
        H, D = A.rd_table(0.8, np.array([0.5]), threshold=t)
        q = A.quantize(x, 2**0.5, threshold=t)
        mse = float(((A.dequantize(q, 2**0.5) - x) ** 2).mean())
        c = torch.unique(q, return_counts=True)[1].double()
        ent = float(-(c / c.sum() * torch.log2(c / c.sum())).sum())
        assert mse == pytest.approx(D[0], rel=0.02)
        assert ent == pytest.approx(H[0], rel=0.01)


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_dead_zone_table_at_fine_steps(gamma, monkeypatch):
    """Beyond the exact bins the table uses the high-rate form; with a dead zone the reconstruction sits off the
    bin's centre, so the tail's distortion is s^2 (1/12 + (t - 1/2)^2), not s^2 / 12: the table agrees with one
    computed from 40x more exact bins, and at fine steps with the high-rate law."""
    ls = np.array([-12.0, -9.0, -6.0])
    for t in (0.5, 0.6, 0.75):
        H, D = A.rd_table(gamma, ls, threshold=t)
        with monkeypatch.context() as m:
            m.setattr(gg_rd, "MAX_BINS", 40 * gg_rd.MAX_BINS)
            H_ref, D_ref = A.rd_table(gamma, ls, threshold=t)
        np.testing.assert_allclose(H, H_ref, atol=1e-5)
        np.testing.assert_allclose(D, D_ref, rtol=2e-3)
        s = 2.0 ** ls[0]
        assert D[0] == pytest.approx(s * s * (1 / 12 + (t - 0.5) ** 2), rel=5e-3)


def test_sqnr_floor_keeps_every_tensor_above_it(synthetic):
    """At a low target the weighted optimum starves the least sensitive tensor (a step near its whole range);
    with a floor every tensor keeps at least that SQNR, the target is still met, and the weighted error rises."""
    tens, weights = synthetic
    w = dict(weights, t2=1e-4)  # one tensor that barely counts

    def run(floor):
        models = [A.tensor_model(k, t, w[k]) for k, t in tens.items()]
        al = A.allocate(models, 1.5, tensors=tens, min_sqnr_db=floor)
        sq = {k: 10 * math.log10(float((t.double() ** 2).sum()) / float(
            ((A.dequantize(A.quantize(t, al.steps[k]), al.steps[k]) - t).double() ** 2).sum())) for k, t in tens.items()}
        return al, sq

    free, sq_free = run(0.0)
    floored, sq_floor = run(6.0)
    assert sq_free["t2"] < 3.0 and min(sq_floor.values()) > 6.0 - 0.5  # the model's SQNR vs the real quantizer
    assert _real_bits(tens, floored.steps) == pytest.approx(1.5, rel=0.02)
    assert _wsse(tens, w, floored.steps) > _wsse(tens, w, free.steps)
    with pytest.raises(A.AllocationError, match="keep every tensor at 12 dB"):  # 12 dB costs about 2 bits each
        A.allocate([A.tensor_model(k, t, w[k]) for k, t in tens.items()], 1.5, min_sqnr_db=12.0)
    # the default floor is soft: kept where the target allows, lowered (not an error) where it does not
    dflt = A.allocate([A.tensor_model(k, t, w[k]) for k, t in tens.items()], 1.5, tensors=tens)
    assert 0.0 < dflt.min_sqnr_db < A.DEFAULT_MIN_SQNR_DB
    assert _real_bits(tens, dflt.steps) == pytest.approx(1.5, rel=0.02)
    assert A.allocate([A.tensor_model(k, t, w[k]) for k, t in tens.items()], 4.0).min_sqnr_db == A.DEFAULT_MIN_SQNR_DB
    # a tensor the calibration never reached (weight 0) is exempt: it still goes to zero rate
    unused = A.allocate([A.tensor_model(k, t, 0.0 if k == "t2" else w[k]) for k, t in tens.items()], 4.0, tensors=tens)
    q = A.quantize(tens["t2"], unused.steps["t2"])
    assert int(q.count_nonzero()) == 0


@pytest.mark.parametrize("target", [2.0, 4.5])
def test_meets_target_and_beats_uniform_steps(synthetic, target):
    tens, weights = synthetic
    models = [A.tensor_model(k, t, weights[k]) for k, t in tens.items()]
    al = A.allocate(models, target, tensors=tens)
    real = _real_bits(tens, al.steps)
    assert abs(real / target - 1) < 0.01
    ours = _wsse(tens, weights, al.steps)
    one_step = _match(tens, real, lambda c: {k: c for k in tens})
    rel_rule = _match(tens, real, lambda c: {k: c * float(t.std()) for k, t in tens.items()})
    for base in (one_step, rel_rule):
        assert _real_bits(tens, base) <= real * 1.002
        assert ours < 0.8 * _wsse(tens, weights, base)


def test_report_has_gap_to_shannon_bound(synthetic):
    tens, weights = synthetic
    al = A.allocate([A.tensor_model(k, t, weights[k]) for k, t in tens.items()], 6.0)
    for r in al.rows:
        assert 0.2 < r["gap_to_slb_bits"] < 0.3  # high rate: 0.5 log2(2 pi e / 12) = 0.254


def test_per_row_steps_pay_when_rows_differ():
    """Rows of very different importance: per-row steps lower the weighted error at the same real size."""
    g = torch.Generator().manual_seed(5)
    t = ggprior.gg.sample((64, 512), beta=0.02, gamma=1.2, generator=g)
    rw = np.exp2(np.linspace(-6, 6, 64))
    tens = {"w": t}
    m_row = A.tensor_model("w", t, float(rw.mean()), row_weight=rw, per_row=True)
    al = A.allocate([m_row], 4.0, per_row=True, tensors=tens)
    assert isinstance(al.steps["w"], np.ndarray) and al.rows[0]["per_row"]
    real = _real_bits(tens, al.steps)
    assert abs(real / 4.0 - 1) < 0.01
    uni = _match(tens, real, lambda c: {"w": c})

    def rw_sse(st):
        e = (A.dequantize(A.quantize(t, st), st) - t) ** 2
        return float((torch.from_numpy(rw)[:, None] * e.double()).sum())

    assert rw_sse(al.steps["w"]) < 0.7 * rw_sse(uni["w"])


def test_bad_targets(synthetic):
    tens, weights = synthetic
    models = [A.tensor_model(k, t, weights[k]) for k, t in tens.items()]
    with pytest.raises(A.AllocationError, match="side information"):
        A.allocate(models, 0.01)
    with pytest.raises(A.AllocationError, match="raw size"):
        A.allocate(models, 32.0)
    with pytest.raises(A.AllocationError, match="side information"):
        A.allocate(models, math.nan)
    with pytest.raises(A.AllocationError, match="no tensors"):
        A.allocate([], 4.0)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sensitivity_weights_grad_and_activations():
    torch.manual_seed(0)
    m = _Tiny()
    xs = [torch.randn(32, 8) * 3 for _ in range(3)]
    ys = [torch.randint(0, 4, (32,)) for _ in range(3)]
    batches = list(zip(xs, ys, strict=True))

    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    w = sensitivity_weights(m, batches, loss_fn=loss_fn)
    assert set(w) == {"a.weight", "a.bias", "b.weight", "b.bias"} and all(v > 0 for v in w.values())
    rows = sensitivity_weights(m, batches, loss_fn=loss_fn, per_row=True)
    assert rows["a.weight"].shape == (16,)
    np.testing.assert_allclose(rows["a.weight"].mean(), w["a.weight"], rtol=1e-9)
    act = sensitivity_weights(m, xs, kind="act")
    assert act["a.weight"] == pytest.approx(float(torch.cat(xs).pow(2).mean()), rel=1e-6)
    assert set(act) == {"a.weight", "b.weight"}
    assert not m.a._forward_hooks
    with pytest.raises(A.AllocationError):
        sensitivity_weights(m, [], loss_fn=loss_fn)
