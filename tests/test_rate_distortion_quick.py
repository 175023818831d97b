"""experiments/rate_distortion.py --quick: every peer and ggprior method on the same tensors, files written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess paths")
def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "rd"
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "rate_distortion.py"), "--quick", "--skip-nncodec",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "rate_distortion.json").read_text())
    assert (out / "rate_distortion.png").stat().st_size > 0 and "| gguf | Q4_0 |" in (out / "README.md").read_text()
    syn, minilm = data["results"]
    methods = {q["method"] for q in minilm["points"]}
    required = {"gguf", "int8", "fp8-e4m3", "ggprior-rel", "ggprior-alloc", "ggprior-alloc-rows", "ggprior-alloc-trellis"}
    if importlib.util.find_spec("torchao"):  # NF4 runs where the bench extra is installed
        required.add("nf4")
    assert required <= methods
    for q in minilm["points"]:
        assert 0.9 < q["quality"] <= 1.0 + 1e-6 and q["bits"] > 0
    for q in syn["points"]:
        if q["method"] in ("ggprior-alloc", "ggprior-alloc-trellis"):  # the target is met by the real code lengths
            assert abs(q["bits"] / float(q["setting"][1:]) - 1) < 0.01
    gguf = {q["setting"]: q["bits"] for q in syn["points"] if q["method"] == "gguf"}
    assert gguf == {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5}
    # --families measures some families again and merges them in: the other points stay, the run is recorded
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "rate_distortion.py"), "--quick", "--skip-nncodec",
                        "--out", str(out), "--families", "ggprior-rel", "--models", "synthetic"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "rate_distortion.json").read_text())
    assert again["results"][1]["points"] == minilm["points"]
    assert [q for q in again["results"][0]["points"] if q["method"] == "gguf"] == [
        q for q in syn["points"] if q["method"] == "gguf"]
    assert sorted(q["setting"] for q in again["results"][0]["points"] if q["method"] == "ggprior-rel") == sorted(
        q["setting"] for q in syn["points"] if q["method"] == "ggprior-rel")
    assert [x["families"] for x in again["meta"]["runs"]] == ["all", "ggprior-rel"]
    assert "ggprior-rel" in (out / "README.md").read_text().split("## ")[0]
