"""ggprior.train.run and ``ggprior train``: outputs, compression figures, quantized evaluation, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model
from typer.testing import CliRunner

from conftest import bag_model as _model
from conftest import toy_task as _task
from ggprior.cli.app import app
from ggprior.codec.lengths import measure
from ggprior.train import TrainConfig
from ggprior.train.run import RunConfig, build, compression_figures, quantized_metrics, weight_tensors

TINY = ["--max-train", "64", "--max-eval", "32", "--epochs", "2", "--max-len", "32", "--no-progress"]


@pytest.mark.slow
def test_cli_writes_metrics_model_and_compression(tmp_path):
    out = tmp_path / "run"
    args = ["train", "spam", str(out), "--model", "gpt2", "--init", "gg", "--gamma", "0.5", "--rate", "backslash",
            "--lam", "50", "--rate-epochs", "1", *TINY]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and [h["rate_active"] for h in hist] == [True, False]
    assert all("validation_accuracy" in h and h["seconds"] > 0 for h in hist)
    assert metrics["run"]["init"] == "gg" and metrics["run"]["gamma"] == 0.5 and metrics["data"]["train"] == 64
    comp = metrics["compression"]
    for c in ("fl", "eg", "huffman", "ans"):
        assert comp[f"bpw_{c}"] > 0 and comp[f"cr_{c}"] == pytest.approx(comp["bpw_fl"] / comp[f"bpw_{c}"])
    assert comp["bpw_entropy"] <= comp["bpw_huffman"] < comp["bpw_entropy"] + 1
    assert 0 <= metrics["quantized_test"]["accuracy"] <= 1

    cfg = RunConfig(task="spam", model="gpt2", max_len=32)
    _, _, fresh = build(cfg)
    load_model(fresh, str(out / "model.safetensors"))
    again = compression_figures(fresh, comp["step"])
    assert again["bpw_huffman"] == pytest.approx(comp["bpw_huffman"])


def test_cli_errors_name_the_bad_value(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "sentiment", str(tmp_path), "--rate", "l0", "--lam", "1", *TINY])
    assert res.exit_code != 0 and "unknown rate 'l0'" in res.output
    res = runner.invoke(app, ["train", "sentiment", str(tmp_path), "--rate", "l1", *TINY])
    assert res.exit_code != 0 and "needs lam > 0" in res.output
    res = runner.invoke(app, ["train", "imdb", str(tmp_path), *TINY])
    assert res.exit_code != 0 and "imdb" in res.output
    res = runner.invoke(app, ["train", "bbc-lm", str(tmp_path), "--model", "bert", *TINY])
    assert res.exit_code != 0 and "encoder" in res.output
    res = runner.invoke(app, ["train", "sentiment", str(tmp_path), "--rate-epochs", "5", *TINY])
    assert res.exit_code != 0 and "rate_epochs" in res.output
    res = runner.invoke(app, ["train", "sentiment", str(tmp_path), "--rate", "backslash", "--lam", "1", "--eps", "0",
                              *TINY])
    assert res.exit_code != 0 and "eps must be > 0" in res.output
    res = runner.invoke(app, ["train", "sentiment", str(tmp_path), "--init", "orthogonal", *TINY])
    assert res.exit_code != 0 and "unknown init 'orthogonal'" in res.output
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_cli_quick_run(tmp_path):
    res = CliRunner().invoke(app, ["train", "spam", str(tmp_path), "--model", "llama", "--rate", "l1", "--lam", "5",
                                   "--max-train", "32", "--max-eval", "16", "--epochs", "1",
                                   "--max-len", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["rate"] == "l1" and metrics["history"][0]["rate_nu_mean"] == 1.0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert "bits/weight" in res.output


def test_compression_figures_match_measure_on_matrices():
    model = _model()
    comp = compression_figures(model, step=0.01)
    _, summary = measure({n: p.detach() for n, p in model.named_parameters()}, step=0.01, include="matrices")
    assert comp["weights"] == 16 * 32 + 2 * 16  # embedding + head matrix; the head bias kept exact
    assert comp["bpw_huffman"] == pytest.approx(summary["bpw_huffman"])
    assert comp["exact_bytes"] == 2 * 4


def test_weights_shrunk_to_zero_cost_almost_nothing_under_eg():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-4)  # every value quantizes to 0 ...
        model.emb.weight[0, 0] = 0.05  # ... but one
    comp = compression_figures(model, step=0.01)
    assert comp["bpw_eg"] < 1.2 < 3 <= comp["bpw_fl"]  # EG: ~1 bit a zero; FL: the width of q = 5 for all


def test_quantized_metrics_restore_the_weights_and_coarse_steps_hurt():
    model = _model()
    data = _task(64, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    fine = quantized_metrics(model, data, step=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    from ggprior.train import evaluate

    assert fine["loss"] == pytest.approx(evaluate(model, data)["loss"], rel=1e-4)
    coarse = quantized_metrics(model, data, step=100.0)  # every matrix becomes 0: uniform logits
    assert coarse["loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0.05)


def test_weight_tensors_count_tied_once():
    from ggprior.tasks.models import build_model

    lm = build_model("gpt2", "lm", vocab_size=64, max_positions=16)
    names = list(weight_tensors(lm))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_run_config_validation():
    with pytest.raises(ValueError, match="step"):
        RunConfig(step=0.0).validate()
    with pytest.raises(ValueError, match="epochs"):
        RunConfig(train=TrainConfig(epochs=0)).validate()


@pytest.mark.slow
@pytest.mark.parametrize("script, stem", [("table2_init", "table2"), ("table3_archs", "table3"),
                                          ("backslash_rate", "backslash_rate")])
def test_study_quick_size_runs(tmp_path, script, stem):
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(repo / "experiments" / f"{script}.py"), "--quick", "--jobs", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    summary = json.loads((tmp_path / f"{stem}.json").read_text())
    runs = json.loads((tmp_path / f"{stem}_runs.json").read_text())
    assert summary["meta"]["command"].startswith(f"python experiments/{script}.py --quick")
    assert sum(r["n"] for r in summary["aggregate"]) == len(runs) > 0
    assert list(tmp_path.glob("*.png")) and list(tmp_path.glob("*.md"))
