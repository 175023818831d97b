"""QuantWeight, the quantized weight tensor subclass: a Parameter that named_parameters, get_parameter,
state_dict, tied weights, torch.compile and FSDP2 see, held as codes (+ scale) the whole time."""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ggprior import formats
from ggprior.formats import FORMATS, QuantWeight, lut_kernels
from ggprior.formats.quant_tensor import quant_linear

EIGHT_BIT = [name for name, f in FORMATS.items() if f.bits == 8]


def _linear(d_in=24, d_out=10, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


class _TiedLM(nn.Module):
    """An embedding and an LM head sharing one weight, as transformers ties them."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_weight_is_a_parameter_that_reads_as_the_decoded_weight(fmt):
    lin = _linear()
    model = formats.to_format(nn.Sequential(lin), fmt)
    w = model.get_parameter("0.weight")
    assert isinstance(w, QuantWeight) and isinstance(w, nn.Parameter) and not w.requires_grad
    assert dict(model.named_parameters())["0.weight"] is w is model[0].weight
    assert w.shape == (10, 24) and w.dtype == torch.float32 and w.codes.dtype == FORMATS[fmt].storage
    decoded = formats.roundtrip(lin.weight.detach(), fmt)
    assert torch.equal(w.dequantize(), decoded) and torch.equal(w, decoded)  # any other op sees the decoded weight
    idx = torch.tensor([[3, 1], [9, 3]])
    assert torch.equal(w.rows(idx), decoded[idx])
    assert "QuantWeight" in repr(w) and fmt in repr(w)
    names, meta = w.__tensor_flatten__()
    back = QuantWeight.__tensor_unflatten__({n: getattr(w, n) for n in names}, meta, w.shape, w.stride())
    assert back.codes is w.codes and back.fmt == fmt and torch.equal(back, decoded)


def test_detach_clone_to_and_copy_act_on_the_inner_tensors():
    w = QuantWeight.from_float(_linear().weight, "int8")
    d, c = w.detach(), w.clone()
    assert isinstance(d, QuantWeight) and d.codes.data_ptr() == w.codes.data_ptr()
    assert isinstance(c, QuantWeight) and c.codes.data_ptr() != w.codes.data_ptr() and torch.equal(c, w)
    moved = w.to("cpu", copy=True)
    assert isinstance(moved, QuantWeight) and torch.equal(moved.codes, w.codes)
    half = w.to(torch.bfloat16)  # the logical dtype changes, the codes stay
    assert half.dtype == torch.bfloat16 and torch.equal(half.codes, w.codes)
    with pytest.raises(TypeError, match="reads as a float tensor"):
        w.to(torch.int32)
    other = QuantWeight.from_float(_linear(seed=1).weight, "int8")
    with torch.no_grad():
        c.copy_(other)  # same format: the codes and scale
        assert torch.equal(c.codes, other.codes) and torch.equal(c.scale, other.scale)
        c.copy_(_linear(seed=2).weight)  # a float tensor: encoded
        assert torch.equal(c, formats.roundtrip(_linear(seed=2).weight.detach(), "int8"))
        c.mul_(0.5)  # an in-place op: decoded, computed, encoded back
        assert torch.equal(c, formats.roundtrip(0.5 * formats.roundtrip(_linear(seed=2).weight.detach(), "int8"),
                                                "int8"))
        plain = torch.zeros(10, 24)
        plain.copy_(w)  # a float tensor written from a QuantWeight gets the decoded values
        assert torch.equal(plain, w.dequantize())
    with pytest.raises(ValueError, match="copy into a"):
        c.copy_(torch.zeros(3, 3))


@pytest.mark.parametrize("fmt", ["rf8", "int8", "fp8-e4m3-scaled"])
def test_row_ops_view_the_codes(fmt):  # what FSDP2 shards with: split, narrow, new_zeros, view, as_strided
    w = QuantWeight.from_float(_linear(8, 10).weight, fmt)
    decoded = w.dequantize()
    parts = torch.chunk(w, 3)
    assert [tuple(p.shape) for p in parts] == [(4, 8), (4, 8), (2, 8)] and all(isinstance(p, QuantWeight) for p in parts)
    assert all(torch.equal(p.dequantize(), d) for p, d in zip(parts, torch.chunk(decoded, 3), strict=True))
    pad = w.new_zeros((12, 8))
    assert isinstance(pad, QuantWeight) and not pad.dequantize().any()
    with torch.no_grad():
        pad.narrow(0, 0, 10).copy_(w)  # a view of the codes: writes into ``pad``
    assert torch.equal(pad.dequantize()[:10], decoded) and not pad.dequantize()[10:].any()
    flat = pad.view(-1)
    assert isinstance(flat, QuantWeight) and torch.equal(flat.dequantize(), pad.dequantize().view(-1))
    cut = torch.as_strided(pad, (10, 8), (8, 1))
    assert isinstance(cut, QuantWeight) and torch.equal(cut.dequantize(), decoded)
    assert torch.equal(w.narrow(1, 2, 3), decoded[:, 2:5]) and not isinstance(w.narrow(1, 2, 3), QuantWeight)
    assert w.new_zeros((2, 3), dtype=torch.int64).dtype == torch.int64


@pytest.mark.parametrize("fmt", EIGHT_BIT)
def test_plain_linear_holding_a_quant_weight_takes_the_fused_kernel(fmt, monkeypatch):
    lin = _linear(150, 50)
    q = formats.QuantLinear.from_linear(lin, fmt)
    lin.weight = q.weight  # a plain nn.Linear: F.linear reaches QuantWeight.__torch_function__
    x = torch.randn(3, 5, 150)
    calls = []
    monkeypatch.setattr("ggprior.formats.quant_tensor.lut_linear",
                        lambda *a: calls.append(1) or lut_kernels.lut_linear(*a))
    with torch.no_grad():
        assert torch.equal(lin(x), q(x)) and len(calls) == 2
        assert torch.equal(F.linear(x, q.weight), quant_linear(x, q.weight))
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()  # wants a gradient: decode-then-matmul, differentiable in x
    assert len(calls) == 4 and torch.allclose(xg.grad, q.weight.dequantize().sum(0).expand(3, 5, 150), atol=1e-5)
    assert lin.bias.grad is not None and lin.weight.grad is None


def test_embedding_decodes_only_the_rows_it_gathers():
    emb = nn.Embedding(40, 16)
    w0 = emb.weight.detach().clone()
    emb.weight = nn.Parameter(QuantWeight.from_float(w0, "int8"), requires_grad=False)  # per-row scales
    ids = torch.tensor([[1, 5, 39], [0, 0, 7]])
    assert torch.equal(emb(ids), formats.roundtrip(w0, "int8")[ids])


@pytest.mark.parametrize("fmt", ["rf8", "int8", "fp8-e4m3-scaled", "bf16"])
def test_state_dict_stores_codes_and_loads_codes_or_a_float_weight(fmt):
    lin = _linear()
    q = formats.QuantLinear.from_linear(lin, fmt)
    sd = q.state_dict()
    assert set(sd) == {"weight_codes", "bias"} | ({"weight_scale"} if FORMATS[fmt].scale != "none" else set())
    assert not any(isinstance(v, QuantWeight) for v in sd.values())  # plain tensors: safetensors stores them
    twin = formats.make_layer(fmt, 24, 10, True)
    assert twin.load_state_dict(sd) is not None and torch.equal(twin.weight, q.weight)
    twin2 = formats.make_layer(fmt, 24, 10, True)
    twin2.load_state_dict({"weight": lin.weight.detach(), "bias": lin.bias.detach()})  # an unconverted state dict
    assert torch.equal(twin2.weight_codes, q.weight_codes) and torch.equal(twin2.bias, lin.bias)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        twin.load_state_dict(sd | {"extra": torch.ones(1)})
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        twin.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="the layer holds"):
        twin.load_state_dict(sd | {"weight_codes": sd["weight_codes"][:3]})


def test_tied_model_state_dict_torch_save_and_deepcopy():
    torch.manual_seed(0)
    model = formats.to_format(_TiedLM(), "rf8")
    assert model.head.weight is model.emb.weight
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        ref = model(ids)
    sd = model.state_dict()
    assert isinstance(sd["emb.weight"], QuantWeight) and sd["head.weight_codes"].data_ptr() == sd["emb.weight"].codes.data_ptr()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([QuantWeight]):
        loaded = torch.load(buf)
    fresh = formats.to_format(_TiedLM(), "rf8")
    fresh.load_state_dict(loaded)
    twin = copy.deepcopy(model)
    assert twin.head.weight is twin.emb.weight and twin.head.weight.codes is not model.head.weight.codes
    with torch.no_grad():
        assert torch.equal(fresh(ids), ref) and torch.equal(twin(ids), ref)
        assert model.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # Module.to: the logical dtype, same codes


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_through_the_subclass(backend):
    torch.manual_seed(0)
    model = formats.to_format(_TiedLM(), "int8")
    single = formats.QuantLinear.from_linear(_linear(32, 12), "rf8")
    ids, x = torch.randint(0, 50, (2, 6)), torch.randn(4, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        ref, ref1 = model(ids), single(x)
        assert torch.equal(torch.compile(model, backend=backend, fullgraph=True)(ids), ref)  # no graph break
        assert torch.equal(torch.compile(single, backend=backend, fullgraph=True)(x), ref1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, fmt: str, rows: int, errors) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = formats.to_format(nn.Sequential(nn.Linear(32, rows), nn.ReLU(), nn.Linear(rows, 8)), fmt)
        x = torch.randn(3, 32)
        with torch.no_grad():
            ref = model(x)
        fully_shard(model[0])
        fully_shard(model)
        local = model[0].weight._local_tensor
        assert isinstance(local, QuantWeight) and local.codes.element_size() == 1
        chunk = -(-rows // world)  # FSDP2's shard: ceil(rows / world) rows, the last one short
        assert local.codes.shape[0] == min(chunk, rows - rank * chunk)
        with torch.no_grad():
            assert torch.equal(model(x), ref) and torch.equal(model(x), ref)  # all-gathered codes, twice
    except Exception as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("fmt", "rows", "world", "error"), [
    ("rf8", 15, 1, None), ("fp8-e4m3-scaled", 15, 2, None), ("int8", 16, 2, None),
    ("int8", 15, 2, "per-row scaled QuantWeight"),
])
def test_fsdp2_shards_the_codes_and_all_gathers_them(fmt, rows, world, error):
    mp = torch.multiprocessing.get_context("spawn")
    errors = mp.SimpleQueue()
    port = _free_port()
    if world == 1:
        _fsdp_worker(0, 1, port, fmt, rows, errors)
    else:
        procs = [mp.Process(target=_fsdp_worker, args=(r, world, port, fmt, rows, errors)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    if error is None:
        assert not found
    else:  # the rank that raises it, and its peer, whose collective loses its partner
        assert any(error in e for e in found), found
