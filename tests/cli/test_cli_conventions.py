"""The CLI's conventions: VERB SOURCE OUT, old spellings answered with the new one, plain-text output,
the help's name lists true to the library, ``ggprior init``; and the lazy public API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ggprior
from ggprior.cli import app, choices


def _text(r) -> str:
    return " ".join(r.output.split())


def _has(r, text: str) -> bool:
    """``text`` appears in the output, whatever line wrapping rich applied (even inside a long path)."""
    return "".join(text.split()) in "".join(r.output.split())


@pytest.mark.parametrize("args, new", [
    (["fit", "minilm", "--out", "x"], "ggprior fit SOURCE OUT"),
    (["measure", "minilm", "--out", "x"], "ggprior measure SOURCE OUT"),
    (["quantize", "minilm", "--format", "rf8", "--out", "x"], "ggprior quantize SOURCE OUT"),
    (["inspect", "m.ggz", "--out", "x"], "ggprior inspect SOURCE [OUT]"),
    (["compress", "minilm", "x.ggz", "--include", "matrices"], "--select all|matrices"),
    (["measure", "minilm", "x", "--include", "matrices"], "--select all|matrices"),
    (["train", "--task", "spam", "--out", "x"], "ggprior train TASK OUT"),
    (["pipeline", "--out", "x"], "ggprior pipeline [TASK] [OUT]"),
    (["gct", "--method", "gct", "--workers", "2", "--lam", "0.1"], "--workers N --comm METHOD"),
    (["train", "spam", "x", "--workers", "2", "--lam", "0.1", "--rate", "l1"], "single-process"),
])
def test_old_spellings_name_the_new_one(tmp_path, monkeypatch, args, new):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert new in _text(res) and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x").exists()


def test_missing_out_is_an_error_with_the_usage(tmp_path):
    res = CliRunner().invoke(app, ["fit", "minilm"])
    assert res.exit_code == 1 and "missing OUT" in res.output and "ggprior fit SOURCE OUT" in res.output


def test_errors_and_paths_are_plain_text_not_markup(tmp_path):
    weird = tmp_path / "a[/x]b[bold]"
    weird.mkdir(parents=True)
    missing = weird / "none.safetensors"
    for args in (["fit", str(missing), str(weird / "out")], ["compress", str(missing), str(weird / "m.ggz")],
                 ["quantize", str(missing), str(weird / "q"), "--format", "rf8"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        assert _has(res, str(missing)) and "MarkupError" not in res.output, res.output
    g = torch.Generator().manual_seed(0)
    src = weird / "m[x].safetensors"
    save_file({"w[/x]": torch.randn(16, 8, generator=g) * 0.05}, str(src))
    res = CliRunner().invoke(app, ["compress", str(src), str(weird / "m.ggz"), "--bits", "6"])
    assert res.exit_code == 0 and _has(res, str(weird / "m.ggz")), res.output
    res = CliRunner().invoke(app, ["inspect", str(weird / "m.ggz")])
    assert res.exit_code == 0 and "w[/x]" in res.output, res.output


def test_help_lists_are_the_library_registries():
    from ggprior import codec, deepshape, formats, gct
    from ggprior.codec.quantizer import INCLUDE_CHOICES
    from ggprior.tasks.models import INIT_SCHEMES
    from ggprior.train.backslash import RATES
    from ggprior.train.run import QUANT_STEP

    assert choices.FORMATS == tuple(formats.FORMATS) and choices.CODERS == codec.CODERS
    assert choices.SELECT == deepshape.SELECT and choices.TAILS == deepshape.TAILS
    assert choices.BIN_WIDTH == deepshape.BIN_WIDTH and choices.N_MIN == deepshape.N_MIN
    assert choices.INIT_SCHEMES == INIT_SCHEMES and choices.RATES == RATES and choices.METHODS == gct.METHODS
    assert choices.QUANT_STEP == QUANT_STEP and choices.INCLUDE == INCLUDE_CHOICES


def test_import_and_help_stay_light():
    code = "import sys, ggprior; print(sorted(m for m in sys.modules if m.startswith(('torch', 'ggprior.'))))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    code = ("import sys; from ggprior.cli import app; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'numpy', 'ggprior.')) "
            "and not m.startswith('ggprior.cli')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves_lazily():
    assert 15 <= len(ggprior.__all__) <= 25
    for name in ggprior.__all__:
        assert getattr(ggprior, name) is not None, name
    assert callable(ggprior.deepshape) and ggprior.deepshape.reshape_values is not None
    assert ggprior.fit(torch.randn(1000, generator=torch.Generator().manual_seed(0))).gamma == pytest.approx(2, rel=0.2)
    with pytest.raises(AttributeError):
        ggprior.no_such_name  # noqa: B018


@pytest.mark.parametrize("config", ["bert", "file"])
def test_init_writes_a_gg_model_that_transformers_loads(tmp_path, config):
    from transformers import AutoModel, BertConfig

    from ggprior import gg

    if config == "file":
        cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, pad_token_id=1)
        cfg.architectures = ["BertModel"]
        cfg.save_pretrained(tmp_path / "cfg")
        config = str(tmp_path / "cfg" / "config.json")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["init", config, str(out), "--gamma", "0.5", "--vocab-size", "300"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())["model_type"]
    model = AutoModel.from_pretrained(out)
    emb = model.get_input_embeddings()
    assert emb.padding_idx is not None and float(emb.weight[emb.padding_idx].detach().abs().sum()) == 0.0
    weights = load_file(out / "model.safetensors")
    name = next(k for k in weights if k.endswith("attention.self.query.weight"))
    assert gg.fit(weights[name]).gamma == pytest.approx(0.5, rel=0.25)
