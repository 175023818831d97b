"""The equal-quality measures of experiments/rate_distortion.py and rd_tasks.py on hand-made curves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import rate_distortion as RD  # noqa: E402


def pts(*bq):
    return [{"bits": b, "quality": q, "setting": f"B{b}"} for b, q in bq]


def test_frontier_higher_better_interpolates_on_the_qualifying_tail():
    # a lucky low point (2 bits) below a failing one (3 bits) does not count for the interpolation
    f = RD.frontier(pts((2.0, 0.90), (3.0, 0.70), (4.0, 0.80), (5.0, 0.95)), 0.90)
    assert f["measured"] == 2.0 and f["measured_setting"] == "B2.0"
    assert f["interp"] == pytest.approx(4.0 + (0.90 - 0.80) / (0.95 - 0.80))
    assert not f["censored"]


def test_frontier_lower_better_and_censoring():
    # perplexity: lower is better; every point qualifies, so the frontier may lie lower (censored)
    f = RD.frontier(pts((3.0, 27.0), (4.0, 26.9)), 27.05, higher_better=False)
    assert f["measured"] == 3.0 and f["interp"] == 3.0 and f["censored"]
    f = RD.frontier(pts((3.0, 30.0), (4.0, 28.0), (5.0, 26.0)), 27.0, higher_better=False)
    assert f["measured"] == 5.0 and f["interp"] == pytest.approx(4.5)
    assert RD.frontier(pts((3.0, 30.0)), 27.0, higher_better=False)["measured"] == math.inf


def test_value_at_or_below_reads_smaller_files_only():
    curve = [{"bits": 3.0, "v": 10.0}, {"bits": 5.0, "v": 20.0}]
    assert RD._value_at_or_below(curve, "v", 4.0) == pytest.approx(15.0)
    assert RD._value_at_or_below(curve, "v", 8.5) == 20.0  # beyond the curve: its best point below
    assert math.isnan(RD._value_at_or_below(curve, "v", 2.0))  # no file of ours that small


def test_same_as_reference_uses_the_half_percent_tolerance():
    res = {"reference_quality": 20.0}
    fam = {"gguf": pts((4.5, 25.0), (8.5, 20.05)), "int8": pts((8.0, 20.2)), "nncodec": pts((6.0, 20.08)),
           "ggprior-alloc": pts((5.0, 21.0), (6.0, 20.09), (7.0, 20.0))}
    sr = RD.same_as_reference(res, {"ggprior-alloc": fam["ggprior-alloc"]}, fam)
    assert sr["threshold"] == pytest.approx(20.1)
    m = sr["measured"]  # int8 (20.2) misses the tolerance; Q8_0 (20.05) and NNCodec (20.08) make it
    assert m["best_fixed"] == "gguf" and m["best_fixed_bits"] == 8.5 and m["best_ggprior_bits"] == 6.0
    assert m["ratio_fixed"] == pytest.approx(6.0 / 8.5) and m["ratio_nncodec"] == pytest.approx(1.0)


def test_equal_kl_interpolates_in_log_kl():
    # KL falls about as 2^(-2 bits): halfway in log KL between 0.04 (4 bits) and 0.0025 (6 bits) is 0.01, at 5 bits
    def p(method, bits, kl, ppl=27.0):
        return {"method": method, "setting": f"B{bits}", "bits": bits, "kl": kl, "quality": ppl,
                "median_sqnr_db": 30.0, "model_sqnr_db": 30.0}

    res = {"model": "smollm2 (test)", "reference_quality": 26.9, "per_tensor": [],
           "points": [p("int8", 8.0, 0.01), p("nncodec", 6.0, 0.0025, 27.5),
                      p("ggprior-alloc", 4.0, 0.04, 28.0), p("ggprior-alloc", 6.0, 0.0025, 26.95)]}
    g = RD.goals(res)
    (int8,) = [e for e in g["kl_equal_quality"] if e["peer"] == "int8"]
    assert int8["ggprior-alloc_bits"] == pytest.approx(5.0) and int8["ratio"] == pytest.approx(5.0 / 8.0)
    assert g["kl_goal_0.75x_fixed_length_peers"] and not g["kl_goal_fewer_bits_than_nncodec"]  # 6.0 vs 6.0: a tie
    assert any("own KL divergence from the original **holds**" in line for line in RD.goal_lines([{**res, "goals": g}]))


def test_merged_replaces_whole_families_or_single_points():
    def pt(m, s, v):
        return {"method": m, "setting": s, "bits": v}

    old = {"meta": {"command": "first", "seconds": 1.0},
           "results": [{"model": "m", "points": [pt("a", "B1", 1), pt("a", "B2", 2), pt("b", "x", 3)], "per_tensor": []}]}
    meta = {"command": "again", "seconds": 2.0, "params": {}}
    d = RD.merged(json.loads(json.dumps(old)), [{"model": "m", "points": [pt("a", "B2", 9)], "per_tensor": []}], meta,
                  ["a:B2"])
    assert d["results"][0]["points"] == [pt("a", "B1", 1), pt("b", "x", 3), pt("a", "B2", 9)]
    d = RD.merged(json.loads(json.dumps(old)), [{"model": "m", "points": [pt("a", "B5", 5)], "per_tensor": []}], meta,
                  ["a"])
    assert d["results"][0]["points"] == [pt("b", "x", 3), pt("a", "B5", 5)]
    assert [r["families"] for r in d["meta"]["runs"]] == ["all", "a"]


@pytest.mark.slow
def test_rd_tasks_quick_merges_points(tmp_path):
    """rd_tasks --quick, then --families with one point: that point is measured again, the others stay."""
    cmd = [sys.executable, str(REPO / "experiments" / "rd_tasks.py"), "--quick", "--skip-nncodec", "--out", str(tmp_path),
           "--models-dir", str(tmp_path / "none")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((tmp_path / "tasks.json").read_text())["results"][0]["points"]
    r = subprocess.run(cmd + ["--families", "ggprior-alloc:B3.0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "tasks.json").read_text())
    again = d["results"][0]["points"]
    key = ("ggprior-alloc", "B3.0")
    assert sorted((q["method"], q["setting"]) for q in again) == sorted((q["method"], q["setting"]) for q in first)
    assert [q for q in again if (q["method"], q["setting"]) != key] == [q for q in first if (q["method"], q["setting"]) != key]
    assert [x["families"] for x in d["meta"]["runs"]] == ["all", "ggprior-alloc:B3.0"]
    bad = subprocess.run(cmd + ["--families", "nosuch"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown families" in bad.stderr
