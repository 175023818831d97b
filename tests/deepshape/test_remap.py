"""The bucket-sort remap's pieces (ggprior.deepshape.remap) against torch, and the fast path against the
sort-based reference on grids and inputs that the small property tests rarely reach: buckets far above
the insertion-sort size, a whole bucket of ties, bin widths that are not powers of two."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ggprior import gg
from ggprior.deepshape import BIN_WIDTH, reshape_values_reference
from ggprior.deepshape.remap import _argsort, _level_runs, reshape_values_fast
from ggprior.deepshape.reshape import _trim


def _skewed(n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":  # ~10^4 values per 16-bit bucket near 1.0
        return 1.0 + torch.rand(n, generator=g) * 1e-2
    if kind == "ties":  # a few hundred distinct values, each repeated
        return torch.round(torch.randn(n, generator=g) * 50) / 64
    if kind == "zeros":  # one bucket holds most values, +0.0 and -0.0 mixed
        x = torch.randn(n, generator=g) * 0.05
        x[torch.rand(n, generator=g) < 0.8] = 0.0
        x[torch.rand(n, generator=g) < 0.4] *= -1.0
        return x
    return gg.sample((n,), 0.0, 0.05, 1.2, generator=g)


@pytest.mark.parametrize("kind", ["dense", "ties", "zeros", "gg"])
@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_bucket_sort_equals_torch_stable_sort_on_big_buckets(kind, index):
    x = _skewed(300_000, kind, seed=3)
    sv, order = _argsort(x.numpy(), index)
    ref = torch.sort(x, stable=True)
    assert order.dtype == index
    assert torch.equal(torch.from_numpy(order.astype(np.int64)), ref.indices)
    assert torch.equal(torch.from_numpy(sv), ref.values)
    assert not np.signbit(sv).any() or (sv[np.signbit(sv)] < 0).all()  # -0.0 comes out as +0.0


def test_non_finite_values_sort_to_the_ends():
    x = torch.tensor([0.5, float("nan"), -1.0, float("inf"), -float("inf"), 2.0, -float("nan")])
    sv, _ = _argsort(x.numpy(), np.int32)
    assert not np.isfinite(sv[0]) and not np.isfinite(sv[-1])
    assert np.isfinite(sv[2:-2]).all()


@given(st.integers(1, 5000), st.floats(1e-5, 0.3), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31))
def test_level_runs_equal_torch_round(n, w, dtype, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.1
    sv = torch.sort(x).values
    levels, counts = _level_runs(sv.numpy(), sv.numpy().dtype.type(w))
    ref_levels, ref_counts = torch.unique_consecutive(torch.round(sv / w).to(torch.int64), return_counts=True)
    assert torch.equal(torch.from_numpy(levels), ref_levels)
    assert torch.equal(torch.from_numpy(counts), ref_counts)


@given(st.lists(st.integers(-40, 40), min_size=2, max_size=400), st.integers(1, 12))
def test_trim_with_a_count_keeps_the_first_to_last_full_bin(levels, n_min):
    hist = Counter(levels)
    full = sorted(lev for lev, c in hist.items() if c >= n_min)
    lev = torch.tensor(sorted(levels))
    ulev, ucnt = torch.unique_consecutive(lev, return_counts=True)
    if not full:
        with pytest.raises(ValueError, match="n_min"):
            _trim(ulev, ucnt, n_min, BIN_WIDTH, "t")
        return
    start, end, a, b, nmin, width = _trim(ulev, ucnt, n_min, BIN_WIDTH, "t")
    assert (a, b, nmin, width) == (full[0], full[-1], n_min, BIN_WIDTH)
    assert start == sum(c for v, c in hist.items() if v < a)
    assert end == len(levels) - sum(c for v, c in hist.items() if v > b)


@given(st.sampled_from([1e-3, 3e-4, 2.0**-11, 7.7e-5]), st.sampled_from(["scale", "keep", "reshape"]),
       st.booleans(), st.integers(0, 2**31))
@example(w=3e-4, tails="keep", snap=False, seed=5611)  # torch's scalar / tensor is reciprocal-then-multiply
@settings(max_examples=12, deadline=None)
def test_fast_equals_reference_bit_for_bit_on_other_grids(w, tails, snap, seed):
    """Exact equality: the same sorted values, levels, core fit and float64 operations, hence the same
    counts and outputs, ties included (both order them by index)."""
    x = gg.sample((120_000,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(seed))
    x[:5000] = torch.round(x[:5000] / 1e-3) * 1e-3  # exact ties across buckets
    ref, ref_report = reshape_values_reference(x, 1.1, 0.8, bin_width=w, tails=tails, snap=snap)
    out, report = reshape_values_fast(x, 1.1, 0.8, bin_width=w, tails=tails, snap=snap)
    assert torch.equal(out, ref)
    assert report.core_fit == ref_report.core_fit and report.cut == ref_report.cut
    assert report.entropy_after == pytest.approx(ref_report.entropy_after, rel=1e-12)


def test_a_strided_view_is_remapped_like_its_copy():
    x = gg.sample((40_000,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(reshape_values_fast(x[::2], 1.1, 0.7)[0], reshape_values_fast(x[::2].clone(), 1.1, 0.7)[0])
