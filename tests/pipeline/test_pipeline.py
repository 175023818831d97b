"""The pipeline at its smallest size: every stage, the report, caching and resume, errors."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.pipeline import CODERS, VARIANTS, PipelineConfig, PipelineError, run_pipeline
from ggprior.pipeline.report import COLUMNS, compute_seconds, summary_rows


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small 'pretrained' safetensors file standing in for MiniLM (its fit is tested elsewhere)."""
    path = tmp_path_factory.mktemp("pre") / "small.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"layer.0.dense.weight": torch.randn(64, 64, generator=g) * 0.05,
               "layer.0.dense.bias": torch.randn(64, generator=g) * 0.01}, str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp("pipe")
    cfg = PipelineConfig.preset("tiny", task="spam", pretrained=str(pretrained))
    return cfg, out, run_pipeline(cfg, out, console=Console(quiet=True), progress=False)


def _stage_mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}


def test_every_stage_writes_its_results(run):
    cfg, out, res = run
    assert set(res["compress"]) == set(VARIANTS) == set(res["formats"])
    for v in VARIANTS:
        assert (out / "models" / f"{v}.safetensors").is_file()
        for coder in CODERS:
            assert (out / "files" / f"{v}.{coder}.ggz").is_file()
        for fmt in cfg.formats:
            assert (out / "files" / f"{v}.{fmt}.safetensors").is_file()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    for name in ("distributions", "rate_accuracy", "formats", "training", "pretrained_fit"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_rows_are_the_real_files(run):
    cfg, out, res = run
    rows = summary_rows(res)
    assert len(rows) == len(VARIANTS) * (1 + len(cfg.formats) + len(CODERS) + 1)
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
    for v in VARIANTS:
        comp = res["compress"][v]
        by_fmt = {r["format"]: r for r in rows if r["variant"] == v}
        # Every coder stores the same integers, so the decoded models score the same.
        assert len({by_fmt[f"ggz-{c}"]["accuracy"] for c in CODERS}) == 1
        for c in CODERS:
            size = (out / "files" / f"{v}.{c}.ggz").stat().st_size
            assert by_fmt[f"ggz-{c}"]["file size (KiB)"] == pytest.approx(size / 1024)
            assert by_fmt[f"ggz-{c}"]["bits/weight"] == pytest.approx(8 * size / comp["weights"])
        assert by_fmt["ggz-ans"]["bits/weight"] < by_fmt["ggz-fl"]["bits/weight"]
        assert by_fmt["rf8"]["bits/weight"] < 0.5 * by_fmt["fp32"]["bits/weight"]
        assert by_fmt["fp16"]["bits/weight"] < 0.6 * by_fmt["fp32"]["bits/weight"]
        assert comp["cr_eg"] == pytest.approx(_cr_eg_of_file(out / "files" / f"{v}.eg.ggz", cfg.bits), rel=1e-12)


def _eg_bits(v: np.ndarray, k: int) -> int:
    """Exp-Golomb order-k length of non-negative integers: k + 2 floor(log2(v // 2^k + 1)) + 1."""
    return int((k + 1 + 2 * np.floor(np.log2((v >> k) + 1))).sum())


def _cr_eg_of_file(path, bits: int) -> float:
    """CR(EG) recomputed from the integers stored in a .ggz file, independently of ggprior.codec.lengths:
    FL = the bits covering [qmin, qmax] per value (at most ``bits``); EG at the best order of the
    zigzag-mapped integers; side information as documented there (step 32 each; FL qmin 32 + width 8;
    EG k 8)."""
    from ggprior.codec import load_integers

    fl = eg = 0
    for q, _ in load_integers(path).values():
        x = q.numpy().astype(np.int64).ravel()
        assert int(np.abs(x).max()) <= (1 << (bits - 1)) - 1
        z = np.where(x >= 0, 2 * x, -2 * x - 1)
        width = max(1, math.ceil(math.log2(int(x.max()) - int(x.min()) + 1)))
        assert width <= bits
        fl += x.size * width + 40 + 32
        eg += min(_eg_bits(z, k) for k in range(24)) + 8 + 32
    return fl / eg


def test_report_is_self_contained_and_tabulates_every_row(run):
    _, out, res = run
    md = (out / "report.md").read_text()
    assert "| variant | format | accuracy | bits/weight |" in md
    assert md.count("| gg-backslash+deepshape |") == len(summary_rows(res)) // len(VARIANTS)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert not re.search(r'src="(?!data:)', html)  # nothing fetched from outside the file
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["task"] == "spam"


def test_rerun_is_cached_and_a_changed_setting_reruns_only_what_depends_on_it(run):
    cfg, out, first = run
    before = _stage_mtimes(out)
    again = run_pipeline(cfg, out, console=Console(quiet=True), progress=False)
    assert _stage_mtimes(out) == before
    assert summary_rows(again) == summary_rows(first)
    # the report states the stages' compute time, not the cached rerun's (was "Total time 11 s")
    assert compute_seconds(again) == pytest.approx(compute_seconds(first))
    assert compute_seconds(first) > again["seconds"]
    assert f"Compute time {compute_seconds(again):.0f} s" in (out / "report.md").read_text()
    changed = PipelineConfig.preset("tiny", task="spam", pretrained=cfg.pretrained, k_beta=0.5)
    run_pipeline(changed, out, console=Console(quiet=True), progress=False)
    after = _stage_mtimes(out)
    same = {k for k in before if after[k] == before[k]}
    assert same == {"stats.json", "train-he-plain.json", "train-gg-backslash.json", "compress-he-plain.json",
                    "compress-gg-backslash.json", "formats-he-plain.json", "formats-gg-backslash.json"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task": "weather"}, "unknown task"),
    ({"arch": "minilm"}, "arch must be"),
    ({"epochs": 0}, "epochs"),
    ({"bits": 40}, "bits"),
    ({"k_beta": -1.0}, "positive"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(PipelineError, match=message):
        PipelineConfig.preset("tiny", **overrides)


def test_unknown_size_is_refused():
    with pytest.raises(PipelineError, match="unknown size"):
        PipelineConfig.preset("huge")


def test_cli_reports_a_bad_task_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["pipeline", "weather", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown task 'weather'" in result.output


def test_a_changed_training_setting_retrains_instead_of_resuming_the_old_checkpoint(run, tmp_path):
    cfg, out, _ = run
    copy = tmp_path / "pipe"
    shutil.copytree(out, copy)
    changed = PipelineConfig.preset("tiny", task="spam", pretrained=cfg.pretrained, lr=cfg.lr / 2)
    res = run_pipeline(changed, copy, console=Console(quiet=True), progress=False)
    assert res["config"]["lr"] == cfg.lr / 2
    saved = json.loads((copy / "train" / "he-plain" / "metrics.json").read_text())
    assert saved["config"]["lr"] == cfg.lr / 2


def test_fewer_epochs_than_backslash_epochs_shortens_the_backslash_phase():
    cfg = PipelineConfig.preset("default", epochs=1)
    assert (cfg.epochs, cfg.backslash_epochs) == (1, 1)
    with pytest.raises(PipelineError, match="backslash_epochs"):
        PipelineConfig.preset("default", epochs=1, backslash_epochs=2)

