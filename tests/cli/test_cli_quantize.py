"""``ggprior quantize``: a HF folder in, a quantized safetensors file + per-tensor table out; errors."""

import json
import math

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ggprior import formats
from ggprior.cli.app import app
from ggprior.tasks import models


def _gpt2():
    torch.manual_seed(0)
    return models.build_model("gpt2", "lm", vocab_size=128, max_positions=16).eval()


def test_quantize_a_hf_folder_and_load_it_back(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = _gpt2()
    model.config.save_pretrained(src)  # a HF folder as save_pretrained writes it: the tied LM head left out
    src_sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(src_sd, str(src / "model.safetensors"))
    res = CliRunner().invoke(app, ["quantize", str(src), str(out), "--format", "int8", "--exclude", "wpe"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "quantize.md").is_file()
    rows = json.loads((out / "quantize.json").read_text())
    names = {r["tensor"] for r in rows}
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.wpe.weight" not in names
    assert all(r["format"] == "int8" and r["sqnr_db"] > 30 for r in rows)
    loaded = formats.load_quantized(out / formats.QUANTIZED_FILE)
    sd = model.state_dict()
    assert torch.equal(loaded["transformer.wpe.weight"], sd["transformer.wpe.weight"])
    name = "transformer.h.1.mlp.c_fc.weight"  # a Conv1D (in x out): int8 scales each output channel
    assert torch.equal(loaded[name], formats.roundtrip(sd[name].t(), "int8").t())
    fresh = formats.load_quantized_model(_gpt2(), out / formats.QUANTIZED_FILE)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert formats.relative_error(model(ids).logits, fresh(ids).logits) < 0.05


def test_quantize_errors(tmp_path):
    runner = CliRunner()
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([[1.0, float("nan")]])}, str(weights))
    res = runner.invoke(app, ["quantize", str(weights), str(tmp_path / "o"), "--format", "rf8"])
    assert res.exit_code == 1 and "w: 1 NaN" in res.output
    res = runner.invoke(app, ["quantize", str(weights), str(tmp_path / "o"), "--format", "fp4"])
    assert res.exit_code == 1 and "unknown format 'fp4'" in res.output
    res = runner.invoke(app, ["quantize", str(tmp_path / "none"), str(tmp_path / "o"), "--format", "rf8"])
    assert res.exit_code == 1 and "no such file" in res.output
    res = runner.invoke(app, ["quantize", str(weights), str(weights), "--format", "rf8"])
    assert res.exit_code == 1 and "not a folder" in res.output
    res = runner.invoke(app, ["quantize", str(weights), str(tmp_path / "o"), "--format", "rf8",
                              "--include", "("])
    assert res.exit_code == 1 and "bad tensor-name pattern" in res.output


def test_infinite_values_are_reported_not_silently_saturated(tmp_path):
    """Issue 16 item 8: quantize saturated +-inf silently and printed "lowest SQNR nan dB"."""
    src = tmp_path / "m.safetensors"
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, 0], w[1, 1] = float("inf"), float("-inf")
    save_file({"w": w}, str(src))
    res = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--format", "int8"])
    assert res.exit_code == 0, res.output
    assert "nan" not in res.output and "2 infinite values" in res.output and "w" in res.output
    row = json.loads((tmp_path / "q" / "quantize.json").read_text())[0]
    assert row["saturated"] == 2 and math.isfinite(row["sqnr_db"]) and row["sqnr_db"] > 30
