"""The pipeline at its smallest size: every stage, the report, seeds, caching and resume, errors. The
pretrained path runs on a tiny one-layer BERT standing in for MiniLM (``tiny_pretrained``)."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.pipeline import CODERS, VARIANTS, PipelineConfig, PipelineError, run_pipeline
from ggprior.pipeline.summary import COLUMNS, compute_seconds, mean_sd, seed_pairs, seed_rows, summary_rows

QUIET = {"console": Console(quiet=True), "progress": False}


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory) -> str:
    """A stand-in for the pretrained MiniLM: a one-layer BERT with MiniLM's vocabulary saved as a transformers
    folder (random weights, so the pretrained path runs in seconds)."""
    from transformers import BertConfig, BertForSequenceClassification

    from ggprior.tasks import get_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=get_tokenizer("minilm").vocab_size, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def tiny(pretrained: str, **overrides) -> PipelineConfig:
    """The tiny preset on spam with the stand-in model."""
    return PipelineConfig.preset("tiny", "minilm", task="spam", pretrained=pretrained, **overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pretrained):
    out = tmp_path_factory.mktemp("pipe")
    cfg = tiny(tiny_pretrained)
    return cfg, out, run_pipeline(cfg, out, **QUIET)


def _stage_mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}


def test_every_stage_writes_its_results(run):
    cfg, out, res = run
    assert set(res["compress"]) == set(VARIANTS) == set(res["formats"])
    assert list(res["seeds"]) == ["0", "1"]
    for v in VARIANTS:
        assert (out / "models" / f"{v}.safetensors").is_file()
        for rule in res["compress"][v]["rules"].values():
            for row in rule["rows"]:
                assert row["file"] is None or (out / "files" / row["file"]).is_file()
        for fmt in cfg.formats:
            assert (out / "files" / f"{v}.{fmt}.safetensors").is_file()
    for base in ("plain", "backslash"):
        assert (out / "models" / f"{base}.seed1.safetensors").is_file()
        assert not (out / "train" / f"{base}.seed0" / "checkpoint").exists()  # removed once the model is saved
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    for name in ("distributions", "rate_accuracy", "formats", "training", "pretrained_fit"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_trainings_start_from_the_pretrained_weights_and_only_backslash_zeroes(run, tiny_pretrained):
    _, out, res = run
    from transformers import AutoModelForSequenceClassification

    pre = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=2).state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    for seed in ("0", "1"):  # the proximal step leaves exact zeros beyond the pretrained ones (the padding row)
        trained = res["seeds"][seed]
        assert trained["backslash"]["train"]["exact_zeros"] > 2 * trained["plain"]["train"]["exact_zeros"]
    plain = load_file(str(out / "models" / "plain.safetensors"))
    # fine-tuned, not retrained: a few small steps away from the pretrained matrix, not a fresh init
    assert 0 < float((plain[key] - pre[key]).abs().max()) < 0.2 * float(pre[key].abs().max())


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
            size = (out / "files" / f"{v}.rel{cfg.rel_error:g}.{c}.ggz").stat().st_size
            assert by_fmt[f"ggz-{c}"]["file size (MiB)"] == pytest.approx(size / 2**20)
            assert by_fmt[f"ggz-{c}"]["bits/weight"] == pytest.approx(8 * size / comp["weights"])
        assert by_fmt["ggz-ans"]["bits/weight"] < by_fmt["ggz-fl"]["bits/weight"]
        assert by_fmt["rf8"]["bits/weight"] < 0.5 * by_fmt["fp32"]["bits/weight"]
        assert by_fmt["fp16"]["bits/weight"] < 0.6 * by_fmt["fp32"]["bits/weight"]
        for name, rule in comp["rules"].items():
            eg = out / "files" / f"{v}.{name.replace(' ', '')}.eg.ggz"
            bits = cfg.bits if name == f"{cfg.bits}-bit" else None
            assert rule["cr_eg"] == pytest.approx(_cr_eg_of_file(eg, bits), rel=1e-12)


def test_the_seed_table_compares_every_seed_and_their_mean(run):
    cfg, out, res = run
    pairs = seed_pairs(res)
    assert [p["seed"] for p in pairs] == [0, 1]
    for p in pairs:
        seed = str(p["seed"])
        for base in ("plain", "backslash"):
            assert p[f"{base}_accuracy"] == res["seeds"][seed][base]["train"]["accuracy"]
        # the ANS file of seed 1 is a real file of the seed-1 model
        if seed == "1":
            path = out / "files" / f"backslash.seed1.rel{cfg.rel_error:g}.ans.ggz"
            weights = res["compress"]["backslash"]["weights"]
            assert p["backslash_bpw"] == pytest.approx(8 * path.stat().st_size / weights)
        assert p["difference"] == pytest.approx(100 * (p["backslash_accuracy"] - p["plain_accuracy"]))
    table = seed_rows(res)
    assert len(table) == 3 and table[-1]["seed"] == "mean ± sd (2 seeds)"
    d = [p["difference"] for p in pairs]
    assert table[-1]["difference (points)"] == f"{np.mean(d):+.2f} ± {np.std(d, ddof=1):.2f}"
    assert "## Plain against BackSlash over seeds" in (out / "report.md").read_text()


def test_mean_sd_is_the_sample_spread():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_evaluation_order_does_not_change_accuracy(tiny_pretrained):
    from ggprior.pipeline.context import by_length, load_pretrained
    from ggprior.tasks import get_tokenizer, load_task
    from ggprior.train import evaluate

    d = load_task("spam", "test", get_tokenizer("minilm"), 32, max_examples=96)
    torch.manual_seed(0)
    model = load_pretrained(tiny_pretrained, 2)
    sorted_d = by_length(d)
    lengths = sorted_d.tensors["attention_mask"].sum(dim=1)
    assert bool((lengths[:-1] >= lengths[1:]).all()) and not torch.equal(sorted_d.tensors["labels"], d.tensors["labels"])
    assert evaluate(model, sorted_d)["accuracy"] == evaluate(model, d)["accuracy"]


def _eg_bits(v: np.ndarray, k: int) -> int:
    """Exp-Golomb order-k length of non-negative integers: k + 2 floor(log2(v // 2^k + 1)) + 1."""
    return int((k + 1 + 2 * np.floor(np.log2((v >> k) + 1))).sum())


def _cr_eg_of_file(path, bits: int | None) -> float:
    """CR(EG) recomputed from the integers stored in a .ggz file, independently of ggprior.codec.lengths:
    FL = the bits covering [qmin, qmax] per value (at most ``bits``); EG at the best order of the
    zigzag-mapped integers; side information as documented there (step 32 each; FL qmin 32 + width 8;
    EG k 8). ``bits``: the FL grid's bits, checked against the integers (None for the relative-error rule)."""
    from ggprior.codec import load_integers

    fl = eg = 0
    for q, _ in load_integers(path).values():
        x = q.numpy().astype(np.int64).ravel()
        assert bits is None or int(np.abs(x).max()) <= (1 << (bits - 1)) - 1
        z = np.where(x >= 0, 2 * x, -2 * x - 1)
        width = max(1, math.ceil(math.log2(int(x.max()) - int(x.min()) + 1)))
        assert bits is None or width <= bits
        fl += x.size * width + 40 + 32
        eg += min(_eg_bits(z, k) for k in range(24)) + 8 + 32
    return fl / eg


def test_report_is_self_contained_and_tabulates_every_row(run):
    _, out, res = run
    md = (out / "report.md").read_text()
    assert "| variant | format | accuracy | bits/weight |" in md
    # every summary row, plus one row in the paper-grid table
    assert md.count("| backslash+deepshape |") == len(summary_rows(res)) // len(VARIANTS) + 1
    assert "GG *init* does not apply to pretrained weights" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Coded files on the paper's grid (10-bit)" in html
    assert not re.search(r'src="(?!data:)', html)  # nothing fetched from outside the file
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["task"] == "spam"


def test_rerun_is_cached_and_a_changed_setting_reruns_only_what_depends_on_it(run):
    cfg, out, first = run
    before = _stage_mtimes(out)
    again = run_pipeline(cfg, out, **QUIET)
    assert _stage_mtimes(out) == before
    assert summary_rows(again) == summary_rows(first)
    # the report states the stages' compute time, not the cached rerun's
    wall, cpu = compute_seconds(again)
    assert (wall, cpu) == pytest.approx(compute_seconds(first))
    assert wall > again["seconds"] and cpu > again["cpu_seconds"]
    assert f"Compute time {wall:.0f} s wall, {cpu:.0f} s CPU" in (out / "report.md").read_text()
    run_pipeline(tiny(cfg.pretrained, k_beta=0.5), out, **QUIET)
    after = _stage_mtimes(out)
    same = {k for k in before if after[k] == before[k]}
    trained = {f"{stage}-{base}-s{seed}.json" for stage in ("train", "code") for base in ("plain", "backslash")
               for seed in (0, 1)} - {"code-plain-s0.json", "code-backslash-s0.json"}
    assert same == {"stats.json", "reference.json", *trained, "compress-plain.json", "compress-backslash.json",
                    "formats-plain.json", "formats-backslash.json"}


def test_small_bert_is_trained_from_scratch_with_he_and_gg_init(tmp_path):
    cfg = PipelineConfig.preset("tiny", task="spam", seeds=1, formats=("rf8",), coders=("ans",),
                                pretrained=str(_pretrained_file(tmp_path)))
    res = run_pipeline(cfg, tmp_path / "out", **QUIET)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "He init + plain" in md and "GG init (gamma 0.1) + BackSlash" in md
    assert "one seed gives no spread" in md
    assert res["train"]["plain"]["parameters"] < 1_000_000  # the small BERT, not MiniLM


def test_the_default_fine_tunes_minilm_and_tiny_trains_the_small_bert():
    assert PipelineConfig.preset().model == "minilm"
    assert PipelineConfig.preset("tiny").model == "small-bert"
    assert PipelineConfig.preset("tiny", "minilm").model == "minilm"


def _pretrained_file(folder):
    """A small safetensors file for the statistics stage of a from-scratch run."""
    path = folder / "small.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"layer.0.dense.weight": torch.randn(64, 64, generator=g) * 0.05}, str(path))
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task": "weather"}, "unknown task"),
    ({"arch": "minilm"}, "arch must be"),
    ({"epochs": 0}, "epochs"),
    ({"bits": 40}, "bits"),
    ({"k_beta": -1.0}, "positive"),
    ({"seeds": 0}, "seeds"),
    ({"update": "newton"}, "update"),
    ({"rel_error": 2.0}, "rel_error"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(PipelineError, match=message):
        PipelineConfig.preset("tiny", **overrides)


def test_unknown_size_and_model_are_refused():
    with pytest.raises(PipelineError, match="unknown size"):
        PipelineConfig.preset("huge")
    with pytest.raises(PipelineError, match="unknown model"):
        PipelineConfig.preset("tiny", "gpt5")


@pytest.mark.parametrize(("args", "message"), [
    (["pipeline", "weather", "OUT"], "unknown task 'weather'"),
    (["pipeline", "spam", "OUT", "--model", "gpt5"], "unknown model 'gpt5'"),
])
def test_cli_reports_bad_settings_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, [str(tmp_path) if a == "OUT" else a for a in args])
    assert result.exit_code == 1
    assert message in result.output


def test_an_interrupted_training_of_other_settings_is_not_resumed(run, tmp_path):
    cfg, out, _ = run
    copy = tmp_path / "pipe"
    shutil.copytree(out, copy)
    stale = copy / "train" / "plain.seed0" / "checkpoint"
    stale.mkdir(parents=True)
    (stale / "latest.json").write_text("{not a checkpoint of these settings")
    res = run_pipeline(tiny(cfg.pretrained, lr=cfg.lr / 2), copy, **QUIET)
    assert res["config"]["lr"] == cfg.lr / 2
    saved = json.loads((copy / "train" / "plain.seed0" / "metrics.json").read_text())
    assert saved["config"]["lr"] == cfg.lr / 2


def test_fewer_epochs_than_backslash_epochs_shortens_the_backslash_phase():
    cfg = PipelineConfig.preset("default", "small-bert", epochs=1)
    assert (cfg.epochs, cfg.backslash_epochs) == (1, 1)
    with pytest.raises(PipelineError, match="backslash_epochs"):
        PipelineConfig.preset("default", "small-bert", epochs=1, backslash_epochs=2)
