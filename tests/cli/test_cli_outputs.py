"""Outputs never destroy inputs (issue 16 item 4): the same path, symlinks included, is refused, and an
existing output is replaced only with --overwrite."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ggprior.cli import app


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 0.05}, str(path))
    return path


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(res, text):
    assert res.exit_code == 1 and text in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("verb", [("compress", "--bits", "8"), ("deepshape",), ("quantize", "--format", "int8")])
@pytest.mark.parametrize("via_link", [False, True])
def test_output_equal_to_input_is_refused(tmp_path, model, verb, via_link):
    before = model.read_bytes()
    out = model
    if via_link:
        out = tmp_path / "link.safetensors"
        out.symlink_to(model)
    if verb[0] == "quantize":  # a folder output: refused when the input is the file it would write
        folder = tmp_path / "q"
        folder.mkdir()
        (folder / "quantized.safetensors").symlink_to(model)
        res = _run(verb[0], folder / "quantized.safetensors", folder, *verb[1:], "--overwrite")
    else:
        res = _run(verb[0], model, out, *verb[1:], "--overwrite")
    _refused(res, "is the input")
    assert model.read_bytes() == before


def test_decompress_onto_its_input_is_refused(tmp_path, model):
    ggz = tmp_path / "m.ggz"
    assert _run("compress", model, ggz).exit_code == 0
    before = ggz.read_bytes()
    _refused(_run("decompress", ggz, ggz, "--overwrite"), "is the input")
    link = tmp_path / "l.safetensors"
    link.symlink_to(ggz)
    _refused(_run("decompress", ggz, link, "--overwrite"), "is the input")
    assert ggz.read_bytes() == before


def test_init_into_the_folder_of_its_config_is_refused(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "cfg"
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(folder)
    before = (folder / "config.json").read_text()
    _refused(_run("init", folder / "config.json", folder, "--gamma", "1", "--overwrite"), "is the input")
    assert (folder / "config.json").read_text() == before


def test_existing_output_needs_overwrite(tmp_path, model):
    ggz = tmp_path / "m.ggz"
    ggz.write_bytes(b"keep me")
    _refused(_run("compress", model, ggz), "already exists (pass --overwrite")
    assert ggz.read_bytes() == b"keep me"
    assert _run("compress", model, ggz, "--overwrite").exit_code == 0
    out = tmp_path / "d.safetensors"
    assert _run("decompress", ggz, out).exit_code == 0
    _refused(_run("decompress", ggz, out), "already exists")
    assert _run("decompress", ggz, out, "--overwrite").exit_code == 0
    assert set(load_file(str(out))) == {"w"}
    q = tmp_path / "q"
    assert _run("quantize", model, q, "--format", "int8").exit_code == 0
    _refused(_run("quantize", model, q, "--format", "int8"), "already exists")
    assert _run("quantize", model, q, "--format", "rf8", "--overwrite").exit_code == 0
    assert json.loads((q / "quantize.json").read_text())[0]["format"] == "rf8"


def test_error_text_with_brackets_is_printed_verbatim(capsys):
    """Issue 16 item 1: a worker's error text such as KeyError('[/x]') ended in a MarkupError traceback."""
    import typer

    from ggprior.cli.app import fail

    with pytest.raises(typer.Exit):
        fail("worker 1 of 2 failed: KeyError('[/x]') in [bold]a.weight[/bold]; the other workers were stopped")
    err = capsys.readouterr().err
    assert "KeyError('[/x]') in [bold]a.weight[/bold]" in err.replace("\n", "")
