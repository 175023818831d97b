"""The examples under examples/ run at their --tiny size (the torchrun one with 2 gloo processes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_trainer_backslash_tiny(tmp_path):
    out = _main("trainer_backslash")(["--tiny", "--out", str(tmp_path)])
    assert out["steps"] == 4 and 0 <= out["accuracy"] <= 1 and 0.1 <= out["nu_last"] <= 3.0
    assert out["history"][0]["rate_active"]


def test_plain_loop_backslash_tiny():
    out = _main("plain_loop_backslash")(["--tiny"])
    assert out["steps"] == 4 and 0 <= out["accuracy"] <= 1 and 0.1 <= out["nu_last"] <= 3.0


def _free_port() -> int:
    from ggprior.gct.launch import free_port

    return free_port()


@pytest.mark.parametrize("trainer", [False, True])
def test_torchrun_gct_tiny(tmp_path, trainer):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(EXAMPLES / "torchrun_gct.py"), "--tiny", "--timeout", "60", "--out", str(tmp_path)]
    if trainer:
        cmd.append("--trainer")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{\"workers\"")][-1]
    out = json.loads(line)
    assert out["workers"] == 2 and out["trainer"] == trainer and out["in_sync"] and out["steps"] == 2
    assert 0 < out["bytes_per_step"] < 0.2 * out["fp32_bytes_per_step"] and out["raw_buckets"] == 0
