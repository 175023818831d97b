import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from ggprior import gg
from ggprior.cli import app
from ggprior.io.sources import SourceError, builtin_model_dir, open_source
from ggprior.stats import LINEAR_ROW, MODEL_ROW, fit_model, tensor_group


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.attention.self.query.weight": gg.sample((64, 64), 0, 0.05, 1.2, generator=g),
        "encoder.layer.0.attention.self.query.bias": gg.sample((64,), 0, 0.02, 1.0, generator=g),
        "encoder.layer.0.intermediate.dense.weight": gg.sample((256, 64), 0, 0.05, 0.8, generator=g),
        "encoder.layer.0.output.LayerNorm.weight": 1 + 0.01 * torch.randn(64, generator=g),
        "embeddings.word_embeddings.weight": gg.sample((300, 64), 0, 0.05, 1.6, generator=g),
        "embeddings.position_ids": torch.arange(64).unsqueeze(0),
    }


def test_groups_by_name():
    assert tensor_group("bert.encoder.layer.3.attention.self.key.weight") == "attention"
    assert tensor_group("encoder.layer.3.output.dense.weight") == "mlp"
    assert tensor_group("encoder.layer.3.attention.output.dense.weight") == "attention"
    assert tensor_group("model.layers.0.mlp.gate_proj.weight") == "mlp"
    assert tensor_group("transformer.h.0.ln_1.weight") == "norms"
    assert tensor_group("model.norm.weight") == "norms"
    assert tensor_group("transformer.wte.weight") == "embeddings"
    assert tensor_group("classifier.bias") == "biases"
    assert tensor_group("classifier.weight") == "other"


def test_fit_model_rows_and_exact_pools(tmp_path):
    sd = _state()
    rows = fit_model(sd, progress=False)
    by = {r["name"]: r for r in rows}
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    assert "embeddings.position_ids" not in by  # integer buffers are not parameters
    assert set(floats) <= set(by)
    model = by[MODEL_ROW]
    assert model["numel"] == sum(sd[k].numel() for k in floats)
    pooled = gg.fit(torch.cat([sd[k].reshape(-1) for k in floats]))
    assert model["gamma"] == pytest.approx(pooled.gamma, rel=1e-9)
    assert model["beta"] == pytest.approx(pooled.beta, rel=1e-9)
    lin = gg.fit(torch.cat([sd[k].reshape(-1) for k in floats if k.endswith("weight") and sd[k].ndim == 2
                             and "embed" not in k]))
    assert by[LINEAR_ROW]["gamma"] == pytest.approx(lin.gamma, rel=1e-9)
    q = by["encoder.layer.0.attention.self.query.weight"]
    assert q["group"] == "attention" and q["shape"] == "64x64"
    for key in ("loglik_gg", "loglik_gauss", "ks_gg", "ks_gauss"):
        assert key in q
    assert {"group:attention", "group:mlp", "group:norms", "group:biases", "group:embeddings"} <= set(by)


def test_fit_model_same_from_module_state_dict_and_safetensors(tmp_path):
    lin = nn.Linear(128, 64)
    a = fit_model(lin, progress=False, gof=False)
    path = tmp_path / "m.safetensors"
    save_file({k: v.detach().contiguous() for k, v in lin.state_dict().items()}, str(path))
    b = fit_model(str(path), progress=False, gof=False)
    rb = {r["name"]: r for r in b}
    assert {r["name"] for r in a} == set(rb)
    for ra in a:
        assert ra["gamma"] == pytest.approx(rb[ra["name"]]["gamma"], rel=1e-12)


def test_constant_tensor_gets_a_note_not_a_crash():
    sd = {"w": torch.randn(100, 10), "norm.weight": torch.ones(10)}
    rows = fit_model(sd, progress=False)
    note = next(r for r in rows if r["name"] == "norm.weight")
    assert "constant" in note["note"] and "gamma" not in note


def test_nan_tensor_raises_naming_it():
    with pytest.raises(ValueError, match="bad.weight"):
        fit_model({"bad.weight": torch.tensor([[1.0, float("nan")], [0.0, 2.0]])}, progress=False)


def test_safetensors_streams_in_chunks(tmp_path):
    x = torch.randn(1000, 37)
    path = tmp_path / "big.safetensors"
    save_file({"w": x}, str(path))
    src = open_source(path)
    chunks = list(src.iter_chunks("w", max_elems=37 * 100))
    assert len(chunks) == 10
    assert torch.equal(torch.cat(chunks), x.reshape(-1))
    assert src.shape("w") == (1000, 37) and src.dtype("w") == torch.float32


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(SourceError, match="bad.safetensors"):
        open_source(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="folder holds no"):
        open_source(tmp_path / "empty")
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    with pytest.raises(SourceError, match="unsupported file type"):
        open_source(txt)
    with pytest.raises(SourceError, match="unknown built-in"):
        builtin_model_dir("gpt5")


class _Payload:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_torch_bin_loaded_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(8, 4)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    src = open_source(tmp_path)
    assert torch.equal(src["a.weight"], sd["a.weight"])
    # a malicious pickle is refused, naming the file, and its code never runs
    bad, marker = tmp_path / "evil" / "pytorch_model.bin", tmp_path / "pwned"
    bad.parent.mkdir()
    torch.save({"a.weight": torch.zeros(2), "x": _Payload(marker)}, bad)
    with pytest.raises(SourceError, match="pytorch_model.bin"):
        open_source(bad.parent)["a.weight"]
    with pytest.raises(SourceError, match="pytorch_model.bin"):
        open_source(bad)["a.weight"]
    assert not marker.exists()


def test_minilm_builtin_linear_weights():
    src = open_source("minilm")
    assert sum(src.numel(k) for k in src if src.dtype(k).is_floating_point) == 22_713_216
    names = [k for k in src if len(src.shape(k)) == 2 and "embeddings" not in k]
    rows = fit_model(src, progress=False, gof=False, names=names)
    lin = next(r for r in rows if r["name"] == LINEAR_ROW)
    # the streamed two-pass pool equals one fit of every linear weight at once (was: MiniLM's
    # gamma 1.24 and beta 0.058 copied from the output)
    whole = gg.fit(torch.cat([src[k].reshape(-1).double() for k in names]))
    assert lin["numel"] == whole.n
    for key in ("mu", "beta", "gamma"):
        assert lin[key] == pytest.approx(getattr(whole, key), rel=1e-9, abs=1e-12)


def test_cli_fit_writes_everything(tmp_path):
    sd = _state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["fit", str(path), str(out), "--plots", "2"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "fit.json").read_text())
    names = [r["name"] for r in rows]
    assert MODEL_ROW in names
    for key in ("name", "numel", "mu", "beta", "gamma", "loglik_gg", "loglik_gauss", "ks_gg", "ks_gauss"):
        assert key in rows[0]
    assert (out / "fit.csv").read_text().startswith("name,")
    assert "| name |" in (out / "fit.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "fit_model.png" in pngs and "fit_linear.png" in pngs and len(pngs) == 4
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cli_fit_missing_source_fails_cleanly(tmp_path):
    res = CliRunner().invoke(app, ["fit", str(tmp_path / "nope.safetensors"), str(tmp_path)])
    assert res.exit_code != 0
    assert "no such file" in res.output
    assert not (tmp_path / "fit.json").exists()


def test_fit_model_streams_empty_matrices(tmp_path):
    """Issue 16 item 5: a (0, N) tensor made iter_chunks divide by zero."""
    path = tmp_path / "m.safetensors"
    w = gg.sample((32, 16), 0, 0.05, 1.2, generator=torch.Generator().manual_seed(0))
    save_file({"empty.weight": torch.zeros(0, 16), "w.weight": w}, str(path))
    src = open_source(path)
    assert [c.numel() for c in src.iter_chunks("empty.weight")] == [0]
    rows = {r["name"]: r for r in fit_model(path, progress=False)}
    assert rows[MODEL_ROW]["numel"] == w.numel()
    assert "note" in rows["empty.weight"] and rows["w.weight"]["gamma"] > 0


def test_nothing_fittable_and_bad_gof_values_are_errors(tmp_path):
    """Issue 16 item 8: a 0-d tensor printed NaN fits with exit 0; --gof-values -1 was accepted."""
    path = tmp_path / "scalar.safetensors"
    save_file({"w": torch.tensor(1.5)}, str(path))
    with pytest.raises(ValueError, match="nothing to fit.*constant"):
        fit_model(path, progress=False)
    res = CliRunner().invoke(app, ["fit", str(path), str(tmp_path / "out")])
    assert res.exit_code == 1 and "nothing to fit" in res.output and not (tmp_path / "out").exists()
    good = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(good))
    res = CliRunner().invoke(app, ["fit", str(good), str(tmp_path / "out2"), "--gof-values", "-1"])
    assert res.exit_code == 1 and "-1" in res.output and not (tmp_path / "out2").exists()
