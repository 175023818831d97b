"""Quantization: steps from a step / bit budget / relative error, integer maps, error paths."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggprior.codec import bits
from ggprior.codec import quantizer as quant
from ggprior.codec.quantizer import QuantError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@given(hnp.arrays(np.float32, st.integers(1, 200), elements=finite), st.floats(1e-3, 10.0))
def test_quantize_dequantize_error_at_most_half_step(a, step):
    t = torch.from_numpy(a)
    q = quant.quantize(t, step)
    s32 = float(np.float32(step))
    assert q.dtype == torch.int32
    w = quant.dequantize(q, step, torch.float64)
    assert float((w - t.double()).abs().max()) <= s32 / 2 * (1 + 1e-6) + 1e-6
    # the float32-rounded step reproduces the same integers
    assert torch.equal(quant.quantize(t, s32), q)


def test_quantize_rounds_half_to_even_and_keeps_device_dtype():
    t = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, 0.49])
    assert quant.quantize(t, 1.0).tolist() == [-2, 0, 0, 2, 2, 0]
    assert quant.dequantize(torch.tensor([3, -2]), 0.25, torch.float16).dtype == torch.float16
    assert quant.dequantize(torch.tensor([3, -2]), 0.25).tolist() == [0.75, -0.5]


@pytest.mark.parametrize("bits", [2, 4, 8, 10, 16])
def test_step_for_bits_fills_the_symmetric_range(bits):
    t = torch.randn(4000, generator=torch.Generator().manual_seed(bits)) * 0.05
    s = quant.step_for_bits(t, bits)
    q = quant.quantize(t, s)
    top = (1 << (bits - 1)) - 1
    assert int(q.abs().max()) == top  # the largest weight lands on the last level
    assert float(np.float32(s)) == s
    assert s == pytest.approx(float(t.abs().max()) / top, rel=1e-6)


def test_step_for_bits_special_tensors():
    assert quant.step_for_bits(torch.zeros(5), 10) == 1.0
    assert quant.step_for_bits(torch.zeros(0), 10) == 1.0
    with pytest.raises(QuantError, match="bits must be an integer"):
        quant.step_for_bits(torch.ones(3), 1)
    with pytest.raises(QuantError, match="w1.*NaN"):
        quant.step_for_bits(torch.tensor([1.0, float("nan")]), 8, name="w1")


@pytest.mark.parametrize("rel", [0.3, 0.05, 0.01, 0.001])
def test_step_for_rel_error_meets_target(rel):
    g = torch.Generator().manual_seed(7)
    t = torch.randn(20000, generator=g) * 0.02 + 0.001
    s = quant.step_for_rel_error(t, rel)
    err = quant.rel_error(t, s)
    assert err <= rel * 1.01
    assert err >= rel * 0.9  # the largest such step, not just any small one
    assert quant.rel_error(t, s * 1.2) > rel


def test_rel_error_known_value_and_zero_tensor():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # step 2: 1 -> 0 (round half even), 2 -> 2, 3 -> 4, 4 -> 4: error (1, 0, 1, 0) / sqrt(30)
    assert quant.rel_error(t, 2.0) == pytest.approx(math.sqrt(2 / 30))
    assert quant.rel_error(torch.zeros(3), 0.1) == 0.0
    assert quant.step_for_rel_error(torch.zeros(3), 0.1) == 1.0
    with pytest.raises(QuantError, match="relative error"):
        quant.step_for_rel_error(t, 1.5)


@given(hnp.arrays(np.int64, st.integers(0, 100), elements=st.integers(-(2**40), 2**40)))
def test_zigzag_round_trip_and_order(q):
    z = bits.zigzag(q)
    assert z.dtype == np.uint64
    assert np.array_equal(bits.unzigzag(z), q)
    assert np.array_equal(z, np.where(q >= 0, 2 * q, -2 * q - 1).astype(np.uint64))


def test_zigzag_known_values():
    assert bits.zigzag(np.array([0, -1, 1, -2, 2, -3])).tolist() == [0, 1, 2, 3, 4, 5]


@given(hnp.arrays(np.int64, st.integers(0, 100), elements=st.integers(-(2**40), 2**40)))
def test_sign_magnitude_round_trip(q):
    m, s = bits.sign_magnitude(q)
    assert m.dtype == np.uint64 and s.dtype == np.uint8
    assert np.array_equal(m.astype(np.int64), np.abs(q))
    assert np.array_equal(s.astype(bool), q < 0)
    assert np.array_equal(bits.from_sign_magnitude(m, s), q)


def test_quantize_errors_name_the_tensor():
    with pytest.raises(QuantError, match="enc.w: contains NaN"):
        quant.quantize(torch.tensor([0.0, float("inf")]), 0.1, name="enc.w")
    with pytest.raises(QuantError, match="enc.w: step .* too small"):
        quant.quantize(torch.tensor([1e6]), 1e-6, name="enc.w")
    with pytest.raises(QuantError, match="floating-point"):
        quant.quantize(torch.tensor([1, 2]), 0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-50):
        with pytest.raises(QuantError, match="step"):
            quant.check_step(bad, "w")


def test_choose_step_and_include_policy():
    t = torch.linspace(-1, 1, 101)
    assert quant.choose_step(t, step=0.1) == float(np.float32(0.1))
    assert quant.choose_step(t, bits=8) == quant.step_for_bits(t, 8)
    assert quant.choose_step(t, rel=0.01) == quant.step_for_rel_error(t, 0.01)
    with pytest.raises(QuantError, match="exactly one"):
        quant.choose_step(t, step=0.1, bits=8)
    with pytest.raises(QuantError, match="exactly one"):
        quant.choose_step(t)
    assert quant.is_included("norm.weight", (8,), "all")
    assert not quant.is_included("norm.weight", (8,), "matrices")
    assert quant.is_included("fc.weight", (8, 8), "matrices")
    with pytest.raises(QuantError, match="include"):
        quant.is_included("x", (1,), "some")


@pytest.mark.parametrize("dtype, values, rule", [
    (torch.float32, [3.4028234e38, -3e38, 1.0], {"bits": 10}),
    (torch.float16, [65504.0, -65000.0, 1.0, 0.5] * 8, {"rel": 0.01}),
    (torch.float16, [65504.0, -65504.0, 3.0], {"bits": 2}),
    (torch.bfloat16, [3.3e38, -3.3e38, 1.0], {"bits": 3}),
])
def test_finite_weights_decode_to_finite_values(dtype, values, rule):
    """Issue 16 item 3: q * step cast back to the tensor's dtype never overflows to +-inf."""
    t = torch.tensor(values, dtype=dtype)
    step = quant.choose_step(t, **rule)
    q = quant.quantize(t, step, name="w")
    w = quant.dequantize(q, step, dtype)
    assert bool(torch.isfinite(w).all()), w
    # clamping costs at most one step: the error stays below a step
    assert float((w.double() - t.double()).abs().max()) <= step * (1 + 1e-6)


@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(2, 31),
       st.floats(0.5, 1.0))
def test_values_near_the_dtype_maximum_decode_finite(dtype, nbits, frac):
    top = float(torch.finfo(dtype).max)
    t = torch.tensor([top * frac, -top * frac, top * frac / 3], dtype=dtype)
    step = quant.step_for_bits(t, nbits)
    assert bool(torch.isfinite(quant.dequantize(quant.quantize(t, step), step, dtype)).all())


@pytest.mark.parametrize("nbits", [2, 10, 31])
@pytest.mark.parametrize("value", [5e-43, 1.4e-45, 1e-40])
def test_subnormal_weights_get_a_positive_step(nbits, value):
    """Issue 16 item 5: values below ~7e-43 used to make the step 0 (ZeroDivisionError)."""
    t = torch.tensor([value, -value, 0.0], dtype=torch.float32)
    step = quant.step_for_bits(t, nbits)
    assert step >= quant.MIN_STEP > 0
    q = quant.quantize(t, step)
    assert int(q.abs().max()) <= (1 << (nbits - 1)) - 1
    assert float((quant.dequantize(q, step).double() - t.double()).abs().max()) <= step / 2 * (1 + 1e-6)
    assert quant.step_for_rel_error(t, 0.01) >= quant.MIN_STEP


def test_steps_beyond_float32_are_named_without_numpy_warnings():
    """Issue 16 item 8: --rel-error near float32's maximum said "tensor:" without the name, after a NumPy
    RuntimeWarning."""
    import warnings

    t = torch.tensor([3.4e38, -3.4e38, 1e38])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(QuantError, match=r"^big\.w: quantization step .* not representable in float32"):
            quant.choose_step(t, rel=0.5, name="big.w")
        with pytest.raises(QuantError, match=r"^w: "):
            quant.check_step(1e300, "w")
