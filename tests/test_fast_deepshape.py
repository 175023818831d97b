"""reshape_values_fast (radix sort + fused remap; the library's reshape_values) against the sort-based
reshape_values_reference, the oracle."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ggprior import deepshape, gg
from ggprior.deepshape import BIN_WIDTH, reshape_values_reference
from ggprior.deepshape.remap import reshape_values_fast, stable_sort


@st.composite
def gg_weights(draw):
    shape = draw(st.sampled_from([(5000,), (64, 96), (3, 40, 50), (20000,), (128, 257)]))
    gamma = draw(st.floats(0.4, 3.0))
    beta = draw(st.floats(0.01, 0.2))
    mu = draw(st.sampled_from([0.0, 0.0, 1e-3, -0.01]))
    seed = draw(st.integers(0, 2**31))
    x = gg.sample(shape, mu, beta, gamma, generator=torch.Generator().manual_seed(seed))
    ties = draw(st.sampled_from(["none", "grid", "zeros", "coarse"]))
    if ties == "grid":
        x = torch.round(x / (BIN_WIDTH / 3)) * (BIN_WIDTH / 3)  # many exact ties
    elif ties == "zeros":
        x[torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.3] = 0.0
        x[0] = -0.0
    elif ties == "coarse":
        x = torch.round(x / 0.004) * 0.004
    if draw(st.booleans()):
        x = x.double()
    return x


def _same_report(a, b):
    for f in ("numel", "n_core", "n_low", "n_high", "n_min", "cut_width", "cut", "new_cut", "target"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.core_fit == b.core_fit
    for f in ("before", "after", "after_core"):
        assert math.isclose(getattr(a, f).gamma, getattr(b, f).gamma, rel_tol=1e-6), f
        assert math.isclose(getattr(a, f).beta, getattr(b, f).beta, rel_tol=1e-6), f
    assert math.isclose(a.entropy_before, b.entropy_before, rel_tol=1e-9)
    assert math.isclose(a.entropy_after, b.entropy_after, rel_tol=1e-9)
    assert math.isclose(a.rel_change, b.rel_change, rel_tol=1e-5, abs_tol=1e-12)


def _options(draw):
    return {
        "tails": draw(st.sampled_from(["scale", "keep", "reshape"])),
        "snap": draw(st.booleans()),
        "rounding": draw(st.sampled_from(["cumulative", "largest_remainder"])),
        "n_min": draw(st.sampled_from([1e-3, 1e-2, 2])),
    }


def _call(fn, x, kg, kb, opts, **extra):
    try:
        return fn(x, kg, kb, **opts, **extra), None
    except ValueError as e:
        return None, str(e)


@given(gg_weights(), st.sampled_from([(1.1, 0.7), (1.0, 1.0), (0.8, 1.2), (1.5, 0.9)]), st.data())
def test_bit_identical_to_reference(x, k, data):
    opts = _options(data.draw)
    ref, ref_err = _call(reshape_values_reference, x, *k, opts)
    fast, fast_err = _call(reshape_values_fast, x, *k, opts)
    assert ref_err == fast_err
    if ref is None:
        return
    assert fast[0].dtype == ref[0].dtype and fast[0].shape == ref[0].shape
    assert torch.equal(fast[0], ref[0])
    assert torch.equal(torch.signbit(fast[0]), torch.signbit(ref[0]))
    _same_report(fast[1], ref[1])


@given(gg_weights(), st.data())
def test_one_pass_core_fit_within_one_bin(x, data):
    opts = _options(data.draw)
    ref, ref_err = _call(reshape_values_reference, x, 1.1, 0.7, opts)
    fast, fast_err = _call(reshape_values_fast, x, 1.1, 0.7, opts, exact=False)
    if ref is None or fast is None:
        return  # a limit case (target too narrow) may fall either side of the check
    d = (fast[0].double() - ref[0].double()).abs()
    scale = ref[0].double().abs().clamp(min=1.0)
    assert bool((d <= BIN_WIDTH + 1e-6 * scale).all())
    assert (d > 1e-6 * scale).float().mean() < 0.01  # bin moves are rare; tiny tail differences are not


@given(st.integers(0, 3000), st.integers(0, 2**31), st.sampled_from(["normal", "ties", "specials"]))
def test_stable_sort_equals_torch(n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** float(torch.randint(-30, 30, (1,), generator=g))
    if kind == "ties":
        x = torch.round(x * 4) / 4
    elif kind == "specials" and n:
        pool = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
        x = pool[torch.randint(0, 8, (n,), generator=g)]
    sv, order = stable_sort(x)
    rv, ro = torch.sort(x, stable=True)
    assert torch.equal(order, ro)
    assert torch.equal(sv, rv)  # -0.0 == 0.0
    sv64, o64 = stable_sort(x.double())
    assert torch.equal(o64, torch.sort(x.double(), stable=True).indices)


def test_errors_match_reference():
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, float("nan")]), torch.arange(10)):
        with pytest.raises(ValueError) as a:
            reshape_values_reference(bad, 1.1, 0.7, name="t")
        with pytest.raises(ValueError) as b:
            reshape_values_fast(bad, 1.1, 0.7, name="t")
        assert str(a.value) == str(b.value)
    x = torch.randn(10000) * 1e-4
    with pytest.raises(ValueError, match="too narrow"):
        reshape_values_fast(x, 1.1, 0.7)


def test_large_tensor_identical():
    x = gg.sample((1_000_000,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(5))
    a, ra = reshape_values_reference(x, 1.1, 0.7)
    b, rb = reshape_values_fast(x, 1.1, 0.7)
    assert torch.equal(a, b)
    _same_report(rb, ra)
    assert np.isfinite(rb.rel_change)


def test_library_calls_the_fast_path():
    """ggprior.deepshape.reshape_values and the whole-model path run the fast remap."""
    from ggprior.deepshape import model

    assert deepshape.reshape_values is reshape_values_fast
    assert model.reshape_values is reshape_values_fast
    assert deepshape.reshape_values_reference is not reshape_values_fast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_identical(dtype):
    x = gg.sample((64, 300), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(7)).to(dtype)
    for opts in ({}, {"snap": True}, {"tails": "keep"}):
        a, ra = reshape_values_reference(x, 1.1, 0.7, **opts)
        b, rb = reshape_values_fast(x, 1.1, 0.7, **opts)
        assert b.dtype == dtype and torch.equal(a, b)
        _same_report(rb, ra)
        assert rb.bin_width == ra.bin_width


def test_fine_grid_refused_like_reference():
    x = gg.sample((20_000,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(3))
    for w in (1e-12, 1e-9):
        with pytest.raises(ValueError) as a:
            reshape_values_reference(x, 1.1, 0.7, bin_width=w, name="w")
        with pytest.raises(ValueError) as b:
            reshape_values_fast(x, 1.1, 0.7, bin_width=w, name="w")
        assert str(a.value) == str(b.value)
