"""SIGTERM unwinds like an error (issue 16 item 7): no temporary file beside the output, no
``ggprior-dp-*`` folder of a data-parallel run, workers stopped, exit code 143."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from safetensors.torch import save_file


def _start(code: str, tmp_path, **env):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})


def _wait_for(pred, proc, what, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[0]}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_sigterm_during_a_write_leaves_no_temp_file(tmp_path):
    save_file({"w": torch.randn(128, 64) * 0.05}, str(tmp_path / "m.safetensors"))
    # the writer is slowed down (a big model's save takes seconds) so the signal lands mid-write
    proc = _start("""
        import sys, time
        import ggprior.io.tensors as t
        from ggprior.cli import main
        real = t.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            print("writing", flush=True)
            time.sleep(60)
        t.save_file = slow
        sys.argv = ["ggprior", "deepshape", "m.safetensors", "out.safetensors"]
        main()
    """, tmp_path)
    _wait_for(lambda: any(n.startswith(".out.safetensors.") for n in os.listdir(tmp_path)), proc, "a temp file")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out
    assert "terminated (SIGTERM)" in out
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"], out


def test_sigterm_stops_data_parallel_workers_and_removes_their_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _start("""
        import signal, time
        from ggprior.cli import _terminate
        from ggprior.gct.launch import launch
        def hang(rank, world):
            print("worker", rank, flush=True)
            time.sleep(120)
        signal.signal(signal.SIGTERM, _terminate)
        launch(hang, 2, start_method="fork", timeout=30)
    """, tmp_path, TMPDIR=str(scratch))
    _wait_for(lambda: any(n.startswith("ggprior-dp-") for n in os.listdir(scratch)), proc, "ggprior-dp-* folder")
    time.sleep(1.0)  # workers started
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "Terminated" in out, out
    assert [n for n in os.listdir(scratch) if n.startswith("ggprior-dp-")] == []
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
