"""CLI: compress / inspect / decompress round trip on a small model, measure, and error messages."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.codec import read_header
from ggprior.codec.lengths import quantized_state_dict
from ggprior.codec.registry import CODERS


def _text(r) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(r.output.split())


@pytest.fixture
def model_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"enc.weight": torch.randn(32, 24, generator=g) * 0.05, "enc.bias": torch.randn(32, generator=g) * 0.01,
          "emb.weight": (torch.randn(50, 16, generator=g) * 0.1).half()}
    path = tmp_path / "small.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.mark.parametrize("coder", CODERS)
def test_compress_inspect_decompress_round_trip(tmp_path, model_file, coder):
    path, sd = model_file
    ggz, out = tmp_path / "m.ggz", tmp_path / "back.safetensors"
    r = CliRunner().invoke(app, ["compress", str(path), str(ggz), "--bits", "8", "--coder", coder])
    assert r.exit_code == 0, r.output
    assert "m.ggz" in _text(r) and f"({coder})" in _text(r)
    r = CliRunner().invoke(app, ["inspect", str(ggz), str(tmp_path / "insp")])
    assert r.exit_code == 0, r.output
    assert "enc.weight" in r.output and "32x24" in r.output
    rows = json.loads((tmp_path / "insp" / "inspect.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {row["name"] for row in rows} == set(sd) and all(row["coder"] == coder for row in rows)
    r = CliRunner().invoke(app, ["decompress", str(ggz), str(out)])
    assert r.exit_code == 0, r.output
    back, ref = load_file(str(out)), quantized_state_dict(sd, bits=8)
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_compress_step_and_include(tmp_path, model_file):
    path, sd = model_file
    ggz, out = tmp_path / "m.ggz", tmp_path / "back.safetensors"
    r = CliRunner().invoke(app, ["compress", str(path), str(ggz), "--step", "0.01", "--select", "matrices"])
    assert r.exit_code == 0, r.output
    assert "2 quantized tensors" in _text(r) and "1 tensors stored raw" in _text(r)
    assert CliRunner().invoke(app, ["decompress", str(ggz), str(out)]).exit_code == 0
    back = load_file(str(out))
    assert torch.equal(back["enc.bias"], sd["enc.bias"])
    assert float((back["enc.weight"] - sd["enc.weight"]).abs().max()) <= 0.005 + 1e-7


def test_compress_trellis(tmp_path, model_file):
    path, sd = model_file
    sd = {**sd, "big.weight": torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * 0.02}
    save_file(sd, str(path))
    ggz, out = tmp_path / "m.ggz", tmp_path / "back.safetensors"
    r = CliRunner().invoke(app, ["compress", str(path), str(ggz), "--rel-error", "0.01", "--trellis"])
    assert r.exit_code == 0, r.output
    assert "4 quantized tensors" in _text(r) and "(trellis)" in _text(r)
    enc = {e["name"]: e["encoding"] for e in read_header(ggz)["tensors"]}
    assert enc == {"big.weight": "trellis", "enc.weight": "quantized", "enc.bias": "quantized", "emb.weight": "quantized"}
    assert CliRunner().invoke(app, ["decompress", str(ggz), str(out)]).exit_code == 0
    back = load_file(str(out))
    assert all(float((back[k].float() - v.float()).norm() / v.float().norm()) < 0.012 for k, v in sd.items())
    r = CliRunner().invoke(app, ["compress", str(path), str(tmp_path / "b.ggz"), "--target-bits", "4", "--trellis"])
    assert r.exit_code == 0 and "(trellis)" in _text(r), r.output
    assert {e["name"]: e["encoding"] for e in read_header(tmp_path / "b.ggz")["tensors"]}["big.weight"] == "trellis"
    for extra in (["--per-row"], ["--lossless"]):
        r = CliRunner().invoke(app, ["compress", str(path), str(tmp_path / "x.ggz"), "--trellis", *extra])
        assert r.exit_code != 0 and "--trellis" in _text(r) and len(r.output.strip().splitlines()) == 1


def test_measure_writes_tables(tmp_path, model_file):
    path, _ = model_file
    out = tmp_path / "meas"
    r = CliRunner().invoke(app, ["measure", str(path), str(out), "--rel-error", "0.05"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "compression_summary.json").read_text())
    assert summary["step_rule"] == "rel_error=0.05" and summary["quantized_tensors"] == 3
    assert (out / "compression_bits.png").stat().st_size > 0
    assert "huffman" in r.output


def test_cli_errors_are_one_clear_line(tmp_path, model_file):
    path, _ = model_file
    ggz = tmp_path / "m.ggz"
    r = CliRunner().invoke(app, ["compress", str(path), str(ggz), "--step", "0.1", "--bits", "8"])
    assert r.exit_code == 1 and "only one of --step, --bits, --rel-error" in _text(r)
    r = CliRunner().invoke(app, ["compress", str(path), str(ggz), "--coder", "zip"])
    assert r.exit_code == 1 and "unknown coder 'zip'" in _text(r)
    assert not ggz.exists()
    assert CliRunner().invoke(app, ["compress", str(path), str(ggz), "--bits", "6"]).exit_code == 0
    data = bytearray(ggz.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.ggz"
    bad.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["decompress", str(bad), str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "checksum mismatch" in _text(r) and "bad.ggz" in _text(r)
    assert not (tmp_path / "x.safetensors").exists()
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 1 and "not a .ggz file" in _text(r)
