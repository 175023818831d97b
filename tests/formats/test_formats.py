"""Every weight format behind one interface: values, saturation, scales, layers, model conversion, files."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from ggprior import formats
from ggprior.formats import FORMATS, surgery
from ggprior.tasks import models

ALL = list(FORMATS)
# relative RMS error bound of one round trip on N(0, 0.05^2) weights (worst-case step / 2 of each grid)
BOUND = {"rf8": 0.25, "rf8-round": 0.175, "rf8-authors": 0.11, "fp16": 2**-11, "bf16": 2**-8,
         "fp8-e4m3": 2**-4, "fp8-e5m2": 2**-3, "fp8-e4m3-scaled": 2**-4, "fp8-e5m2-scaled": 2**-3, "int8": 0.06}


def weights(*shape, seed=0, std=0.05):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("fmt", ALL)
def test_round_trip_keeps_shape_dtype_and_error_bound(fmt):
    w = weights(64, 48)
    f = formats.get_format(fmt)
    q = f.quantize(w, name="w")
    assert q.codes.dtype == f.storage and q.codes.shape == w.shape
    assert (q.scale is None) == (f.scale == "none")
    back = formats.roundtrip(w, fmt)
    assert back.dtype == w.dtype and back.shape == w.shape
    assert formats.relative_error(w, back) < BOUND[fmt]
    assert formats.roundtrip(w.to(torch.bfloat16), fmt).dtype == torch.bfloat16
    assert f.storage_bits(tuple(w.shape)) == w.numel() * f.bits + 32 * {"none": 0, "tensor": 1, "channel": 64}[f.scale]


@pytest.mark.parametrize("fmt", ALL)
def test_nan_is_refused_and_infinities_saturate(fmt):
    with pytest.raises(ValueError, match=r"blk\.w: 1 NaN"):
        formats.encode(torch.tensor([[1.0, float("nan")]]), fmt, name="blk.w")
    back = formats.roundtrip(torch.tensor([[float("inf"), -float("inf"), 0.5, -0.25]]), fmt)
    assert bool(torch.isfinite(back).all())
    assert back[0, 0] > 0 > back[0, 1] and back[0, 0] == -back[0, 1]


def test_unknown_format_and_non_float_input():
    with pytest.raises(ValueError, match="known: rf8, rf8-round"):
        formats.get_format("fp4")
    with pytest.raises(TypeError, match="w: expected a floating-point tensor"):
        formats.encode(torch.ones(2, 2, dtype=torch.int32), "int8", name="w")


def test_known_values_of_the_baselines():
    x = torch.tensor([1000.0, 1e-4, 0.3, -1e6, 3.0])
    assert formats.roundtrip(x, "fp8-e4m3").tolist() == [448.0, 0.0, 0.3125, -448.0, 3.0]
    assert formats.roundtrip(x, "fp8-e5m2").tolist() == [1024.0, 1.75 * 2.0**-14, 0.3125, -57344.0, 3.0]
    assert formats.roundtrip(x, "fp16").tolist()[3] == -65504.0
    assert formats.roundtrip(x, "rf8").tolist() == [768.0, 1.5 * 2.0**-14, 0.28125, -49152.0, 3.0]


def test_unscaled_fp8_flushes_small_weights_and_scaling_fixes_it():
    w = weights(32, 32, std=1e-3)
    assert formats.error_stats(w, formats.roundtrip(w, "fp8-e4m3"))["flushed"] > 0.2
    assert formats.error_stats(w, formats.roundtrip(w, "fp8-e4m3-scaled"))["flushed"] < 0.01
    below = float((w.abs() < 2.0**-15).double().mean())  # RF8 truncation flushes only below its range
    assert 0 < formats.error_stats(w, formats.roundtrip(w, "rf8"))["flushed"] == pytest.approx(below)
    q = formats.encode(w, "fp8-e4m3-scaled")
    assert q.scale.shape == () and q.scale.item() == pytest.approx(float(w.abs().max()) / 448)


def test_int8_is_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 50.0, -100.0], [0.0, 0.0, 0.0]])
    q = formats.encode(w, "int8")
    assert q.scale.tolist() == pytest.approx([1 / 127, 100 / 127, 1.0])
    assert q.codes.tolist() == [[127, -64, 32], [127, 64, -127], [0, 0, 0]]
    assert torch.allclose(formats.decode(q, "int8"), w, rtol=0, atol=100 / 254)


@given(st.lists(st.floats(min_value=-1e4, max_value=1e4, width=32), min_size=1, max_size=40),
       st.sampled_from(["int8", "fp8-e4m3-scaled", "fp8-e5m2-scaled", "bf16"]))
def test_round_trip_is_idempotent_and_bounded_by_amax(xs, fmt):
    x = torch.tensor([xs])
    once = formats.roundtrip(x, fmt)
    assert float(once.abs().max()) <= float(x.abs().max()) * (1 + 2**-7) + 1e-30
    assert torch.allclose(formats.roundtrip(once, fmt), once, rtol=1e-6, atol=0)


def test_error_measures():
    ref = torch.tensor([3.0, 4.0, 0.0])
    assert formats.sqnr_db(ref, ref) == math.inf
    assert formats.sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)
    assert formats.relative_error(ref, torch.tensor([3.0, 4.0, 1.0])) == pytest.approx(0.2)
    assert formats.mean_relative_error(ref, torch.tensor([3.3, 4.0, 5.0])) == pytest.approx(0.05)
    stats = formats.error_stats(ref, torch.tensor([0.0, 4.0, 0.0]))
    assert stats["flushed"] == 0.5 and stats["rel_error"] == pytest.approx(0.6)


# ---------------------------------------------------------------- layers and models

@pytest.mark.parametrize("fmt", ALL)
def test_quantized_layer_state_dict_holds_codes(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    model = formats.to_format(nn.Sequential(lin), fmt)
    layer = model[0]
    assert formats.layer_format(layer) == fmt
    sd = layer.state_dict()
    f = FORMATS[fmt]
    assert sd["weight_codes"].dtype == f.storage and sd["weight_codes"].shape == (6, 12)
    assert ("weight_scale" in sd) == (f.scale != "none")
    assert torch.equal(layer.weight, formats.roundtrip(lin.weight.detach(), fmt))
    x = torch.randn(2, 12)
    assert torch.allclose(layer(x), x @ layer.weight.t() + lin.bias, atol=1e-5)


def _lm(arch):
    torch.manual_seed(0)
    kind = "classification" if arch == "bert" else "lm"
    return models.build_model(arch, kind, vocab_size=256, max_positions=32).eval()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_convert_transformers_models_and_reload_from_safetensors(arch, tmp_path):
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model = _lm(arch)
    linear_bytes = formats.weight_bytes(model)
    with torch.no_grad():
        ref = model(ids).logits
    formats.to_format(model, "rf8")
    assert not any(surgery.is_linear(m) for m in model.modules())
    layers = formats.quantized_layers(model)
    assert layers and set(layers.values()) == {"rf8"}
    assert formats.weight_bytes(model) * 4 == linear_bytes
    assert all(v.dtype == torch.uint8 for k, v in model.state_dict().items() if k.endswith("weight_codes"))
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < formats.relative_error(ref, out) < 0.5
    path = formats.save_quantized_model(model, tmp_path / "m.safetensors")
    fresh = _lm(arch)
    formats.load_quantized_model(fresh, path)
    assert formats.quantized_layers(fresh) == layers
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embedding_and_head_share_one_quantized_parameter(arch):
    model = _lm(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    w0 = model.get_input_embeddings().weight.detach().clone()
    formats.to_format(model, "int8")
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is emb.weight and isinstance(head.weight, nn.Parameter)
    assert isinstance(head.weight, formats.QuantWeight) and not head.weight.requires_grad
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert model.get_parameter(f"{head_name}.weight") is head.weight
    assert dict(head.named_parameters())["weight"] is head.weight
    quantized = [p for p in model.parameters() if isinstance(p, formats.QuantWeight)]  # parameters() dedupes
    assert len(quantized) == len(formats.quantized_layers(model))  # the tied weight is held once
    assert torch.equal(emb.weight.dequantize(), formats.roundtrip(w0, "int8"))
    with torch.no_grad():
        assert torch.equal(emb(ids), formats.roundtrip(w0, "int8")[ids])  # F.embedding decodes the rows gathered
        out = model(ids).logits
        model.tie_weights()  # assigns the embedding's Parameter to the head: still the one Parameter
        assert head.weight is emb.weight and torch.equal(model(ids).logits, out)
        emb.weight.mul_(2.0)  # in place: decoded, doubled, encoded back into the shared codes
        assert torch.equal(head.weight.dequantize(), formats.roundtrip(2 * formats.roundtrip(w0, "int8"), "int8"))
        head.weight = w0  # a float tensor is encoded into the (shared) codes
        assert torch.equal(emb.weight.dequantize(), formats.roundtrip(w0, "int8"))
    with pytest.raises(ValueError, match="expected a tensor of that shape"):
        head.weight = emb.weight[:, :3]


def test_quantized_file_of_a_tied_model_loads_into_a_converted_model(tmp_path):
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model = formats.to_format(_lm("gpt2"), "int8")
    with torch.no_grad():
        out = model(ids).logits
    path = formats.save_quantized_model(model, tmp_path / "m.safetensors")  # the tied embedding: stored decoded
    torch.manual_seed(1)
    fresh = formats.to_format(models.build_model("gpt2", "lm", vocab_size=256, max_positions=32).eval(), "int8")
    formats.load_quantized_model(fresh, path)
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)


@pytest.mark.parametrize("fmt", ["fp16", "fp8-e5m2-scaled", "int8", "rf8-authors"])
def test_every_format_converts_gpt2(fmt, tmp_path):
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model = _lm("gpt2")
    with torch.no_grad():
        ref = model(ids).logits
    formats.to_format(model, fmt)
    with torch.no_grad():
        out = model(ids).logits
    assert formats.relative_error(ref, out) < {"fp16": 1e-3}.get(fmt, 0.3)
    fresh = formats.load_quantized_model(_lm("gpt2"), formats.save_quantized_model(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)


def test_load_model_refuses_a_mismatched_architecture(tmp_path):
    path = formats.save_quantized_model(formats.to_format(_lm("gpt2"), "int8"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="m.safetensors"):
        formats.load_quantized_model(_lm("llama"), path)


# ---------------------------------------------------------------- files from any source

def test_save_quantized_and_load_quantized(tmp_path):
    w = weights(16, 8)
    emb = weights(10, 8, seed=1)
    src = {"a.weight": w, "a.bias": torch.ones(16), "emb.weight": emb, "head.weight": emb, "step": torch.tensor(3)}
    rows = formats.save_quantized(src, tmp_path / "q.safetensors", "fp8-e4m3-scaled",
                                  select=formats.parse_select(exclude=r"^head\."))
    assert [r["tensor"] for r in rows] == ["a.weight", "emb.weight"]
    assert (rows[0]["bytes_in"], rows[0]["bytes_out"]) == (16 * 8 * 4, 16 * 8 + 4)
    out = formats.load_quantized(tmp_path / "q.safetensors")
    assert set(out) == set(src)
    assert torch.equal(out["a.bias"], src["a.bias"]) and torch.equal(out["head.weight"], emb)
    assert torch.equal(out["a.weight"], formats.roundtrip(w, "fp8-e4m3-scaled"))
    assert out["step"].item() == 3
    qf = formats.open_quantized(tmp_path / "q.safetensors")
    assert qf.entries["a.weight"] == {"format": "fp8-e4m3-scaled", "shape": [16, 8], "dtype": "float32",
                                      "layout": "tensor"}


def test_save_quantized_refuses_colliding_names(tmp_path):
    with pytest.raises(ValueError, match="a.weight_codes"):
        formats.save_quantized({"a.weight": weights(4, 4), "a.weight_codes": weights(4, 4)},
                               tmp_path / "q.safetensors", "rf8")


def test_open_quantized_validates_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        formats.open_quantized(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="not a ggprior quantized file"):
        formats.open_quantized(plain)
    bad = tmp_path / "bad.safetensors"
    entry = {"w": {"format": "rf8", "shape": [3, 3], "dtype": "float32", "layout": "tensor"}}
    save_file({"w_codes": torch.zeros(2, 2, dtype=torch.uint8)}, str(bad),
              metadata={formats.META_KEY: json.dumps(entry)})
    with pytest.raises(ValueError, match=r"'w_codes' is U8 \[2, 2\], expected torch.uint8 \[3, 3\]"):
        formats.open_quantized(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        formats.open_quantized(garbage)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(0, 16), (16, 0), (0,)])
def test_empty_tensors_round_trip_in_every_format(name, shape):
    """Issue 16 item 5: int8 on (0, 16) / (16, 0) and fp8-e4m3-scaled on (0, 16) raised from torch."""
    f = formats.get_format(name)
    w = torch.zeros(shape)
    back = f.dequantize(f.quantize(w, name="w"), torch.float32)
    assert tuple(back.shape) == shape


def test_save_quantized_file_with_empty_tensors(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(0, 16), "b": torch.zeros(16, 0), "c": weights(8, 8)}, str(src))
    out = tmp_path / "q.safetensors"
    formats.save_quantized(src, out, "int8")
    back = formats.load_quantized(out)
    assert back["a"].shape == (0, 16) and back["b"].shape == (16, 0)


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
def test_loading_closes_the_safetensors_handle(tmp_path):
    """Issue 16 item 10: safe_open handles were never closed (the file stayed mapped)."""
    path = tmp_path / "q.safetensors"
    formats.save_quantized({"w": weights(64, 32)}, path, "int8")
    back = formats.load_quantized(path)
    model = nn.Sequential(nn.Linear(32, 64))
    formats.save_quantized_model(formats.to_format(model, "rf8"), tmp_path / "m.safetensors")
    formats.load_quantized_model(nn.Sequential(nn.Linear(32, 64)), tmp_path / "m.safetensors")
    assert not _mapped(path) and not _mapped(tmp_path / "m.safetensors")
    assert float(back["w"].abs().sum()) > 0  # decoded tensors outlive the handle
    with formats.open_quantized(path) as qf:
        assert _mapped(path) and qf.entries
    assert not _mapped(path)


def test_int8_scales_gpt2_conv1d_per_output_channel_on_the_file_path(tmp_path):
    """Issue 16 item 10: save_quantized scaled a Conv1D weight (in x out) per input channel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: (32 in, 128 out)
    w = model.state_dict()[name]
    for source in (model, tmp_path / "hf"):
        path = tmp_path / "q.safetensors"
        formats.save_quantized(source, path, "int8")
        with formats.open_quantized(path) as qf:
            e = qf.entries.get(name) or qf.entries[name.removeprefix("transformer.")]
            key = name if name in qf.entries else name.removeprefix("transformer.")
            assert e["transposed"] and tuple(qf.qtensor(key).scale.shape) == (128,)  # one scale per output
        back = formats.load_quantized(path)[key]
        assert back.shape == w.shape
        # per output channel: each column's largest |w| is a code of magnitude 127, so the column's max is exact
        assert torch.allclose(back.abs().amax(dim=0), w.abs().amax(dim=0), rtol=1e-6)
    to = formats.to_format(GPT2LMHeadModel(cfg), "int8")
    formats.load_quantized_model(to, tmp_path / "q.safetensors", strict=False)
