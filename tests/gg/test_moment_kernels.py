"""The vectorised moment kernels (ggprior.gg.moments) at block and SIMD-lane boundaries, against
exactly rounded sums, and the one-pass fit on layouts that stress its provisional centre."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ggprior import gg
from ggprior.gg import moments


@given(st.integers(0, 3 * 64 + 17), st.floats(-2.0, 2.0), st.sampled_from(["f4", "f8", "f2", "bf16"]),
       st.integers(0, 2**31))
def test_kernel_sums_equal_exact_sums(n, centre, kind, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = {"f4": x.float(), "f8": x, "f2": x.half(), "bf16": x.bfloat16()}[kind]
    vals = t.double().tolist()
    sa, sq = moments.centred_sums(t, centre, threads=1)
    assert sa == pytest.approx(math.fsum(abs(v - centre) for v in vals), rel=1e-12, abs=1e-12)
    assert sq == pytest.approx(math.fsum((v - centre) ** 2 for v in vals), rel=1e-12, abs=1e-12)
    assert moments.value_sum(t) == pytest.approx(math.fsum(vals), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pos", [0, 255, 256, 1000, 99_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reassociated_sums_still_see_nan_and_inf(dtype, pos, bad):
    x = torch.randn(100_000, dtype=dtype)
    x[pos] = bad
    assert not math.isfinite(moments.value_sum(x))
    with pytest.raises(ValueError, match="NaN or Inf"):
        moments.fit_moments(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gg.fit(x)


def test_gg_fit_mean_is_the_exact_mean():
    x = gg.sample((1_000_003,), 0.25, 0.05, 1.2, generator=torch.Generator().manual_seed(4))
    assert gg.fit(x).mu == pytest.approx(math.fsum(x.double().tolist()) / x.numel(), rel=1e-14)


@pytest.mark.parametrize("layout", ["sorted", "blocks", "shifted_half"])
def test_one_pass_fit_equals_two_pass_on_structured_layouts(layout):
    """Sorted values, rows of different scale, a mean that differs between halves: the narrow band
    either holds the final centre or the fit takes its exact second pass; gamma matches either way."""
    g = torch.Generator().manual_seed(5)
    x = gg.sample((2_000_000,), 0.0, 0.05, 1.2, generator=g)
    if layout == "sorted":
        x = torch.sort(x).values
    elif layout == "blocks":
        x = x * torch.linspace(0.5, 2.0, 2000).repeat_interleave(1000)
    else:
        x[1_000_000:] += 0.01
    ours, ref = moments.fit_moments(x), gg.fit(x)
    assert ours.gamma == pytest.approx(ref.gamma, rel=1e-9)
    assert ours.beta == pytest.approx(ref.beta, rel=1e-9)
    assert ours.mu == pytest.approx(ref.mu, rel=1e-9, abs=1e-12)


def test_memory_map_fit_equals_in_memory(tmp_path):
    from safetensors.numpy import save_file

    x = gg.sample((300_000,), 0.0, 0.02, 0.9, generator=torch.Generator().manual_seed(6)).numpy()
    save_file({"w": x, "h": x.astype(np.float16)}, str(tmp_path / "m.safetensors"))
    fits = moments.fit_safetensors(tmp_path / "m.safetensors", threads=1)
    assert fits["w"].gamma == pytest.approx(moments.fit_moments(x).gamma, rel=1e-12)
    assert fits["h"].gamma == pytest.approx(gg.fit(torch.from_numpy(x).half()).gamma, rel=1e-9)
