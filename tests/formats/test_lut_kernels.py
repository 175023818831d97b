"""The fused decode-and-multiply path of QuantLinear (formats/lut_kernels.py: the AVX-512 VBMI kernels
of formats/lut_vbmi.py where the CPU has them, numba gathers elsewhere) against the reference path,
decode-then-matmul in torch. Every fused test runs once per kernel."""

from __future__ import annotations

import numba
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ggprior import formats
from ggprior.formats import FORMATS, lut_kernels

EIGHT_BIT = [name for name, f in FORMATS.items() if f.bits == 8]
KERNELS = ["vbmi", "numba"]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Run the test with one kernel: ``vbmi`` (skipped without AVX-512 VBMI) or the numba gathers."""
    if request.param == "vbmi" and not lut_kernels.lut_vbmi.available():
        pytest.skip("the CPU has no AVX-512 VBMI")
    before = lut_kernels.use_vbmi()
    lut_kernels.use_vbmi(request.param == "vbmi")
    yield request.param
    lut_kernels.use_vbmi(before)


def _layer(fmt: str, d_in: int, d_out: int, seed: int = 0, bias: bool = True) -> formats.QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return formats.QuantLinear.from_linear(lin, fmt)


def _tolerance(x: torch.Tensor, layer: formats.QuantLinear) -> torch.Tensor:
    """Float32 rounding bound of a dot product: a few ulps of sum |x_i| |w_i|."""
    return 1e-5 * (x.abs() @ layer.weight.abs().t()) + 1e-30


def test_every_eight_bit_format_has_a_table_that_decodes_like_the_format():
    assert set(EIGHT_BIT) == {"rf8", "rf8-round", "rf8-authors", "fp8-e4m3", "fp8-e5m2", "fp8-e4m3-scaled",
                              "fp8-e5m2-scaled", "int8"}
    assert lut_kernels.lut_table("fp16") is None and lut_kernels.lut_table("bf16") is None
    for fmt in EIGHT_BIT:
        layer = _layer(fmt, 40, 9)
        table = lut_kernels.lut_table(fmt)
        assert table.shape == (256,) and table.dtype == torch.float32
        codes = layer.weight_codes.view(torch.uint8).long()
        scale = 1.0 if layer.weight_scale is None else layer.weight_scale.reshape(-1, 1)
        assert torch.equal(table[codes] * scale, layer.weight), fmt


@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_fused_forward_matches_the_reference_path(fmt, batch, kernel):
    layer = _layer(fmt, 150, 50)  # 150 = two blocks of 64 and a tail of 22
    layer.fused_block_elems = 150 * 16  # numba: 16 rows a block, the last one short
    x = torch.randn(batch, 150)
    with torch.no_grad():
        fast, ref = layer(x), layer.reference_forward(x)
    assert layer._fused(x) is not None
    assert fast.shape == ref.shape == (batch, 50) and fast.is_contiguous()
    assert (fast - ref).abs().le(_tolerance(x, layer) + 1e-6).all()


@given(d_in=st.integers(1, 200), d_out=st.integers(1, 70), batch=st.integers(1, 40),
       block=st.integers(1, 80), fmt=st.sampled_from(EIGHT_BIT), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e3), bias=st.booleans(), vbmi=st.booleans())
def test_fused_equals_reference_over_shapes_and_inputs(d_in, d_out, batch, block, fmt, seed, scale, bias, vbmi):
    layer = _layer(fmt, d_in, d_out, seed, bias)
    layer.fused_block_elems = block * d_in
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed)) * scale
    before = lut_kernels.use_vbmi()
    try:
        lut_kernels.use_vbmi(vbmi)
        with torch.no_grad():
            fast, ref = layer(x), layer.reference_forward(x)
    finally:
        lut_kernels.use_vbmi(before)
    bound = _tolerance(x, layer) + (0.0 if layer.bias is None else 1e-6 * layer.bias.abs())
    assert (fast - ref).abs().le(bound).all()


@given(values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=8, max_size=8))
def test_fused_batch_one_is_the_decoded_dot_product(values):  # the default kernel
    layer = _layer("rf8-round", 8, 3)
    x = torch.tensor(values).reshape(1, 8)
    with torch.no_grad():
        fast = layer(x)
    exact = (x.double() @ layer.weight.double().t() + layer.bias.double()).float()
    assert torch.allclose(fast, exact, rtol=1e-5, atol=1e-5 * float(x.abs().sum() * layer.weight.abs().max()) + 1e-6)


def test_serial_and_parallel_builds_agree():
    layer = _layer("int8", 300, 260)  # 78000 weights: over PARALLEL_MIN_ELEMS
    assert layer.weight_codes.numel() >= lut_kernels.PARALLEL_MIN_ELEMS
    c = layer.weight_codes.view(torch.uint8).numpy()
    t, s = lut_kernels.lut_table("int8").numpy(), layer.weight_scale.numpy()
    x = torch.randn(300).numpy()
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        outs = [torch.empty(260) for _ in range(2)]
        blocks = [torch.empty(260, 300) for _ in range(2)]
        for par in (0, 1):
            lut_kernels._gemv[par](c, t, s, x, layer.bias.detach().numpy(), outs[par].numpy())
            lut_kernels._decode_rows[par](c, t, s, 0, blocks[par].numpy())
    finally:
        numba.set_num_threads(threads)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(blocks[0], layer.weight) and torch.equal(blocks[1], layer.weight)


def test_lut_linear_refuses_arguments_that_do_not_fit():
    layer = _layer("rf8", 70, 9)
    table, codes = lut_kernels.lut_table("rf8"), layer.weight_codes
    one, x = torch.ones(1), torch.randn(2, 70)
    assert lut_kernels.lut_linear(x, codes, table, one, None, 4).shape == (2, 9)
    for bad in [dict(x=torch.randn(2, 71)), dict(x=x.double()), dict(x=x[:, ::2]), dict(table=table[:128]),
                dict(scale=torch.ones(3)), dict(bias=torch.ones(8)), dict(codes=codes.t())]:
        args = dict(x=x, codes=codes, table=table, scale=one, bias=None) | bad
        with pytest.raises(ValueError, match="do not fit"):
            lut_kernels.lut_linear(block_rows=4, **args)


def test_other_inputs_take_the_reference_path(kernel):
    layer = _layer("rf8", 24, 10)
    x = torch.randn(2, 5, 24)
    assert layer._fused(x) is not None
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)
    assert layer._fused(x.to(torch.bfloat16)) is None and layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert _layer("bf16", 24, 10)._fused(x) is None
    xg = x.clone().requires_grad_()
    assert layer._fused(xg) is None
    layer(xg).sum().backward()  # the reference path is differentiable in x
    assert torch.allclose(xg.grad, layer.weight.sum(0).expand(2, 5, 24), atol=1e-5)


def test_fused_path_trains_the_bias_and_keeps_the_codes_untouched(kernel):
    layer = _layer("fp8-e4m3-scaled", 16, 4)
    codes = layer.weight_codes.clone()
    x = torch.randn(3, 16)
    assert layer._fused(x) is not None
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((4,), 3.0))
    assert torch.equal(layer.weight_codes, codes)


def test_torch_compile_traces_the_fused_path_as_one_op(kernel):
    layer = _layer("rf8", 32, 12)
    x = torch.randn(4, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fake tensors; no graph break
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


@pytest.mark.skipif(not lut_kernels.lut_vbmi.available(), reason="the CPU has no AVX-512 VBMI")
def test_vbmi_threads_split_the_rows_without_changing_the_result():
    layer = _layer("int8", 130, 200)
    x = torch.randn(11, 130)
    args = (x, layer.weight_codes.view(torch.uint8), lut_kernels.lut_table("int8"), layer.weight_scale,
            layer.bias.detach())
    outs = [torch.empty(11, 200) for _ in range(3)]
    for threads, out in zip((1, 2, 3), outs, strict=True):
        lut_kernels.lut_vbmi.linear(*args, out, threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with torch.no_grad():
        assert (outs[0] - layer.reference_forward(x)).abs().le(_tolerance(x, layer) + 1e-6).all()
