"""measure(): code lengths and side information against real streams; MiniLM end to end (slow)."""

import math

import pytest
import torch

from ggprior.codec import container, huffman, registry
from ggprior.codec import quantizer as quant
from ggprior.codec.container import load_compressed, load_integers, read_header, save_compressed
from ggprior.codec.histogram import histogram
from ggprior.codec.lengths import measure, quantized_state_dict, summarize
from ggprior.codec.registry import MEASURES as CODERS
from ggprior.codec.registry import column


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(64, 48, generator=g) * 0.05,
        "b.weight": torch.distributions.Laplace(0.0, 0.02).sample((96, 32)),
        "a.bias": torch.randn(64, generator=g) * 0.01,
        "ln.weight": 1 + 0.05 * torch.randn(64, generator=g),
    }


def test_measure_fixed_length_and_ratios():
    sd = _state_dict()
    rows, s = measure(sd, bits=10)
    assert s["quantized_tensors"] == 4 and s["weights"] == sum(t.numel() for t in sd.values())
    for r in rows:
        width = (r["qmax"] - r["qmin"]).bit_length()
        # a zero-centred tensor spans [-511, 511] under a 10-bit quantizer; FL codes q - qmin,
        # so the one-sided norm gains (q in about [430, 511]) need fewer bits
        assert width == (7 if r["name"] == "ln.weight" else 10), r["name"]
        assert r["bits_fl"] == r["numel"] * width + 40 + 32
        assert r["cr_eg"] == r["bits_fl"] / r["bits_eg"]
        assert r["bits_entropy"] <= r["bits_huffman"] <= r["bits_entropy"] + r["numel"] + 64 + 5 * 1023 + 32
        assert r["bits_gg"] >= r["bits_entropy"] - 1e-6
        assert r["rel_error"] == pytest.approx(quant.rel_error(sd[r["name"]], r["step"]))
    assert s["cr_huffman"] == s["bits_fl"] / s["bits_huffman"]
    assert s["ratio_dtype_fl"] == pytest.approx(32 * s["weights"] / s["bits_fl"])
    assert s["model_ratio_fl"] == pytest.approx(s["orig_bytes"] / (s["bits_fl"] / 8))
    g = s["groups"]
    assert g["matrices"]["weights"] + g["vectors"]["weights"] == s["weights"]
    assert set(f"bpw_{column(c)}" for c in CODERS) <= set(s)


def test_measure_keeps_vectors_exact_and_counts_them():
    sd = _state_dict()
    rows, s = measure(sd, step=0.002, include="matrices", coders=["eg", "huffman"])
    exact = {r["name"] for r in rows if r["kind"] == "exact"}
    assert exact == {"a.bias", "ln.weight"}
    assert s["exact_bytes"] == 4 * (64 + 64)
    assert s["model_bytes_eg"] == pytest.approx(s["bits_eg"] / 8 + s["exact_bytes"])
    assert "bits_ans" not in s and "bits_fl" in s  # FL is always measured: it is the reference
    with pytest.raises(ValueError, match="unknown coder"):
        measure(sd, coders=["zip"])


def test_measured_lengths_equal_the_file_streams(tmp_path):
    """The histogram-only figures of measure() are the sizes of the streams the .ggz file stores."""
    sd = _state_dict()
    rows = {r["name"]: r for r in measure(sd, bits=8, gg_fit="moment")[0]}
    for coder in registry.CODERS:
        col = coder.replace("-", "_")
        path = tmp_path / f"{coder}.ggz"
        save_compressed(sd, path, coder=coder, bits=8)
        for e in read_header(path)["tensors"]:
            r = rows[e["name"]]
            got = 8 * container.stored_bytes(e)
            n, nsym = r["numel"], r["qmax"] - r["qmin"] + 1
            if coder in ("ans", "ans-hist"):  # measured: cross-entropy under the stored table + states, range, table
                table = 8 * e["table"]["length"]
                payload = r[f"bits_{col}"] - 32 - 64 - 8 - table  # the chunk: ideal bits + 128 bits of final states
                assert abs((got - table) - payload) <= 64, (coder, e["name"])
                continue
            assert len(e["chunks"]) == 1
            side = {"fl": 40, "eg": 8, "huffman": 64}[coder] + 32
            payload = r[f"bits_{col}"] - side  # what the stream itself holds
            if coder in ("fl", "eg"):
                assert payload <= got < payload + 8, (coder, e["name"])
            else:  # huffman: table and payload are each padded to a byte
                assert payload <= got < payload + 16, e["name"]
                assert payload == huffman.total_bits_hist(histogram(quant.quantize(sd[e["name"]], r["step"]))) \
                    + huffman.LEN_BITS * nsym
        assert n > 0


def test_quantized_state_dict_matches_quantize():
    sd = _state_dict()
    q = quantized_state_dict(sd, rel_error=0.01, include="matrices")
    assert torch.equal(q["a.bias"], sd["a.bias"])
    s = quant.step_for_rel_error(sd["a.weight"], 0.01)
    assert torch.equal(q["a.weight"], quant.dequantize(quant.quantize(sd["a.weight"], s), s))


def test_summarize_without_quantized_rows():
    out = summarize([{"kind": "exact", "orig_bits": 64, "numel": 2}], ["fl"])
    assert out["exact_bytes"] == 8 and "bits_fl" not in out


def test_summarize_all_zero_model_has_infinite_ratio():
    row = {"kind": "quantized", "numel": 8, "orig_bits": 256, "bits_entropy": 0.0, "bits_fl": 40.0}
    out = summarize([row], ["fl", "entropy"])
    assert out["model_bytes_entropy"] == 0 and out["model_ratio_entropy"] == math.inf
    assert out["model_ratio_fl"] == pytest.approx(256 / 40)


def _minilm():
    from transformers import AutoModel

    from ggprior.io.sources import builtin_model_dir

    torch.manual_seed(0)
    return AutoModel.from_pretrained(str(builtin_model_dir("minilm"))).eval()


@pytest.mark.slow
def test_minilm_every_coder_decodes_exactly_and_gives_the_same_outputs(tmp_path):
    torch.set_num_threads(1)
    model = _minilm()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = quantized_state_dict(sd, bits=10)
    ids = torch.randint(0, 30000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    model.load_state_dict(ref)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    sizes = {}
    for coder in registry.CODERS:
        path = tmp_path / f"minilm-{coder}.ggz"
        save_compressed(sd, path, coder=coder, bits=10)
        sizes[coder] = path.stat().st_size
        for name, (ints, step) in load_integers(path).items():
            assert torch.equal(ints, quant.quantize(sd[name], step).long()), (coder, name)
        loaded = load_compressed(path)
        assert all(torch.equal(loaded[k], ref[k]) for k in ref), coder
        model.load_state_dict(loaded)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(got, want), coder
        path.unlink()
    assert sizes["ans"] < sizes["huffman"] < sizes["eg"] < sizes["fl"]


@pytest.mark.slow
def test_minilm_ans_within_one_percent_of_entropy():
    _, s = measure("minilm", bits=10, coders=["ans", "ans_hist", "entropy", "huffman"])
    assert s["bits_ans"] <= 1.01 * s["bits_entropy"]
    assert s["bits_ans_hist"] <= 1.01 * s["bits_entropy"]
    assert s["bits_entropy"] <= s["bits_huffman"] <= s["bits_entropy"] + s["weights"]
    assert math.isclose(s["cr_fl"], 1.0)


def test_ans_stores_the_histogram_where_the_gg_table_loses(tmp_path):
    """A BackSlash-style tensor (most weights exactly zero, the rest Laplace) is coded under its histogram; a GG
    tensor at a fine step (many levels, each seen a few times: a histogram that costs more to store than it saves)
    under the GG table; the measure predicts the file's bytes either way, and both read back exactly."""
    g = torch.Generator().manual_seed(3)
    gg = torch.distributions.Laplace(0.0, 0.02).sample((256, 256))
    spike = torch.distributions.Laplace(0.0, 0.02).sample((256, 256)) * (torch.rand(256, 256, generator=g) > 0.7)
    sd = {"gg.weight": gg, "spike.weight": spike}
    h = save_compressed(sd, tmp_path / "m.ggz", coder="ans", step=0.001)
    coders = {e["name"]: e["coder"] for e in h["tensors"]}
    assert coders == {"gg.weight": "ans", "spike.weight": "ans-hist"}
    rows, _ = measure(sd, step=0.001, coders=["ans", "ans-hist", "gg"])
    by = {r["name"]: r for r in rows}
    assert by["spike.weight"]["bits_ans"] == by["spike.weight"]["bits_ans_hist"]  # the histogram's table is chosen
    assert by["spike.weight"]["bits_gg"] > 1.05 * by["spike.weight"]["bits_ans"]  # the GG misses the spike
    for e in h["tensors"]:  # the file's table and streams: the measure's bits (its side information aside)
        stored = 8 * (e["table"]["length"] + sum(c["length"] for c in e["chunks"]))
        assert stored == pytest.approx(by[e["name"]]["bits_ans"], rel=1e-3)
    back = load_compressed(tmp_path / "m.ggz")
    for k, t in sd.items():
        assert torch.equal(back[k], quant.dequantize(quant.quantize(t, 0.001), 0.001))
