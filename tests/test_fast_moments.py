"""One-pass moment fit (ggprior.gg.moments) against the reference two-pass gg.fit."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from ggprior import gg
from ggprior.gg import moments


def _close(a: gg.GGFit, b: gg.GGFit, rel: float = 1e-6) -> None:
    assert a.n == b.n
    assert a.at_bound == b.at_bound
    assert math.isclose(a.gamma, b.gamma, rel_tol=rel)
    assert math.isclose(a.beta, b.beta, rel_tol=rel)
    assert math.isclose(a.std, b.std, rel_tol=rel)
    assert math.isclose(a.ratio, b.ratio, rel_tol=rel)
    assert math.isclose(a.mu, b.mu, rel_tol=rel, abs_tol=1e-9 * a.std)


@st.composite
def gg_tensors(draw):
    n = draw(st.integers(2, 300_000))
    gamma = draw(st.floats(0.1, 4.0))
    mu = draw(st.sampled_from([0.0, 1e-3, -0.5, 3.0, 1e4]))
    beta = draw(st.floats(1e-4, 10.0))
    seed = draw(st.integers(0, 2**31))
    x = gg.sample((n,), mu, beta, gamma, generator=torch.Generator().manual_seed(seed))
    sparsity = draw(st.sampled_from([0.0, 0.0, 0.5, 0.95]))
    if sparsity:
        x[torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < sparsity] = 0.0
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    if float(x.double().std()) == 0.0:
        x[0] = 1.0 if float(x[0]) != 1.0 else 0.0  # stays finite in every dtype
    return x


@given(gg_tensors(), st.sampled_from([1, 2, 3]))
def test_equals_two_pass_fit(x, threads):
    _close(moments.fit_moments(x, threads=threads), gg.fit(x))


@given(gg_tensors(), st.integers(1, 5))
def test_chunks_equal_whole(x, k):
    pieces = list(x.split(max(1, x.numel() // k)))
    _close(moments.fit_moments(pieces), gg.fit(x))


def test_numpy_inputs_and_bf16_view():
    x = gg.sample((100_000,), 0.0, 0.05, 0.8, generator=torch.Generator().manual_seed(1))
    ref32 = gg.fit(x)
    _close(moments.fit_moments(x.numpy()), ref32)
    _close(moments.fit_moments(x.numpy().astype(np.float16)), gg.fit(x.half()))
    bf = x.bfloat16()
    _close(moments.fit_moments(bf.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16"), gg.fit(bf))
    _close(moments.fit_moments(x.numpy().astype(np.int32) + np.arange(100_000) % 3), gg.fit(
        torch.from_numpy((x.numpy().astype(np.int32) + np.arange(100_000) % 3).astype(np.float32))))


def test_point_mass_in_the_centre_bin_is_exact():
    """Mostly exact zeros with the mean right on them: the second pass makes sum |x - mu| exact."""
    x = torch.zeros(1_000_000)
    x[:1000] = torch.linspace(-1, 1, 1000)
    _close(moments.fit_moments(x), gg.fit(x), rel=1e-9)
    x[0] = 5.0  # shift the mean off the point mass
    _close(moments.fit_moments(x), gg.fit(x), rel=1e-9)


def test_mean_far_from_the_first_chunk():
    """The provisional centre comes from the first chunk; a distant mean takes the exact second pass."""
    a = torch.randn(10_000)
    b = torch.randn(200_000) + 50.0
    _close(moments.fit_moments([a, b]), gg.fit(torch.cat([a, b])), rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    x = torch.randn(10_000)
    x[1234] = bad
    with pytest.raises(ValueError, match="w: contains NaN or Inf"):
        moments.fit_moments(x, name="w")
    with pytest.raises(ValueError, match="NaN or Inf"):
        moments.fit_moments(x.half())


def test_empty_and_constant_raise_like_ggd():
    for x in (torch.zeros(0), [torch.zeros(0), torch.zeros(0)], torch.full((100,), 2.5)):
        with pytest.raises(ValueError) as ours:
            moments.fit_moments(x, name="t")
        with pytest.raises(ValueError) as ref:
            gg.fit(x, name="t")
        assert str(ours.value) == str(ref.value)


def test_bf16_needs_uint16():
    with pytest.raises(TypeError):
        moments.fit_moments(np.zeros(4, np.int16), dtype="bfloat16")
    with pytest.raises(TypeError):
        moments.fit_moments(np.array(["a", "b"]))


def test_safetensors_streamed(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a.weight": gg.sample((300, 200), 0.0, 0.05, 1.2, generator=g),
        "b.weight": gg.sample((1000,), 0.01, 0.1, 0.6, generator=g).half(),
        "c.weight": gg.sample((64, 64), 0.0, 0.02, 2.0, generator=g).bfloat16(),
        "d.weight": gg.sample((500,), 0.0, 1.0, 1.0, generator=g).double(),
        "ids": torch.arange(10),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    fits = moments.fit_safetensors(path, threads=2)
    assert set(fits) == {"a.weight", "b.weight", "c.weight", "d.weight"}
    for name, f in fits.items():
        _close(f, gg.fit(tensors[name]))
    assert set(moments.fit_safetensors(path, ["c.weight"])) == {"c.weight"}


def test_safetensors_damaged(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not a safetensors"):
        moments.fit_safetensors(p)
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="exceeds the file"):
        moments.fit_safetensors(p)
    hdr = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8)
    with pytest.raises(ValueError, match="outside the file"):
        moments.fit_safetensors(p)


@given(gg_tensors(), st.floats(-2.0, 2.0))
def test_centred_sums_kernel_equals_torch_reference(x, shift):
    """The numba kernel behind gg.fit.centred_sums against the torch code it replaced."""
    from ggprior.gg.fit import centred_sums, centred_sums_reference

    centre = float(x.double().mean()) + shift * float(x.double().std())
    a, q = centred_sums(x, centre)
    ra, rq = centred_sums_reference(x, centre)
    assert math.isclose(a, ra, rel_tol=1e-9) and math.isclose(q, rq, rel_tol=1e-9)
    for threads in (1, 3):
        assert moments.centred_sums(x, centre, threads=threads) == pytest.approx((ra, rq), rel=1e-9)
    y = x.clone()
    y[0] = float("nan")
    assert not math.isfinite(centred_sums(y, centre)[0])


def test_callable_chunks_stream_like_a_list():
    x = gg.sample((300_000,), 0.01, 0.05, 0.7, generator=torch.Generator().manual_seed(4))
    pieces = list(x.split(70_000))
    calls = []

    def chunks():
        calls.append(1)
        return iter(pieces)

    _close(moments.fit_moments(chunks), moments.fit_moments(pieces), rel=1e-12)
    assert len(calls) in (1, 2)  # read again only for the exact second pass
    a, b = torch.randn(10_000), torch.randn(200_000) + 50.0  # a mean far from the first chunk's: second pass
    calls.clear()
    _close(moments.fit_moments(lambda: (calls.append(1), iter([a, b]))[1]), gg.fit(torch.cat([a, b])), rel=1e-9)
    assert len(calls) == 2


def test_fit_model_equals_the_old_two_pass_path(monkeypatch):
    """stats.fit_model (one-pass tensor fits, numba pool sums) against the same rows computed with
    gg.fit per tensor and the torch centred sums: every number to 1e-6 (gamma to 1e-9)."""
    import sys

    from ggprior.stats import fit_model, tensors

    g = torch.Generator().manual_seed(11)
    state = {
        "layer.0.attention.query.weight": gg.sample((128, 96), 0, 0.05, 1.2, generator=g),
        "layer.0.attention.query.bias": gg.sample((96,), 0.01, 0.02, 1.0, generator=g).bfloat16(),
        "layer.0.mlp.fc1.weight": gg.sample((300, 96), 0, 0.05, 0.8, generator=g).half(),
        "layer.0.norm.weight": torch.ones(96),  # constant: a row with a note, its values pooled
        "layer.0.norm.bias": torch.zeros(0),  # empty
        "embed.weight": gg.sample((500, 96), 0, 0.05, 1.6, generator=g).double(),
    }
    new = fit_model(state, progress=False, max_gof_values=4096)
    monkeypatch.setattr(tensors, "fit_moments", lambda data, name: gg.fit(data, name=name))
    monkeypatch.setattr(sys.modules["ggprior.gg.fit"], "centred_sums", sys.modules["ggprior.gg.fit"].centred_sums_reference)
    old = fit_model(state, progress=False, max_gof_values=4096)
    assert [r["name"] for r in new] == [r["name"] for r in old]
    for a, b in zip(new, old, strict=True):
        assert a.keys() == b.keys(), a["name"]
        for k, v in a.items():
            if isinstance(v, float):
                assert math.isclose(v, b[k], rel_tol=1e-9 if k == "gamma" else 1e-6, abs_tol=1e-12), (a["name"], k)
            else:
                assert v == b[k], (a["name"], k)
