"""ggprior.threads: parsing of cgroup and /proc files (pure functions), and the thread choice."""

import os

import pytest
import torch

from ggprior import threads


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000\n", None), ("max", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5),
    ("50000 100000", 0.5), ("100000", 1.0), ("", None), ("garbage here", None), ("0 100000", None),
    ("-1 100000", None), ("100000 0", None),
])
def test_parse_cpu_max(text, cpus):
    assert threads.parse_cpu_max(text) == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [
    ("-1\n", "100000\n", None), ("250000\n", "100000\n", 2.5), ("x", "100000", None), ("100000", "0", None),
])
def test_parse_cfs(quota, period, cpus):
    assert threads.parse_cfs(quota, period) == cpus


def test_cgroup_limit_v2_and_v1(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/a/b\n") == 3.0
    (tmp_path / "cpu" / "x").mkdir(parents=True)
    (tmp_path / "cpu" / "x" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "x" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, "2:cpu:/x\n") == 1.5
    assert threads.cgroup_cpu_limit(tmp_path, "2:cpu:/x\n0::/a/b\n") == 1.5
    assert threads.cgroup_cpu_limit(tmp_path / "none", "0::/\n") is None


def test_parse_proc_stat():
    text = "cpu  100 5 50 800 20 0 3 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert threads.parse_proc_stat(text) == (978, 820)
    with pytest.raises(ValueError):
        threads.parse_proc_stat("intr 1 2 3\n")


@pytest.mark.parametrize(("avail", "idle", "n"), [(2, None, 2), (2, 1.1, 1), (2, 0.1, 1), (8, 5.6, 6), (4, 7.9, 4),
                                                  (1, 0.0, 1)])
def test_choose_threads(avail, idle, n):
    assert threads.choose_threads(avail, idle) == n


def test_available_cpus_bounds():
    n = threads.available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_configure_threads_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("GGPRIOR_THREADS", "2")
        assert threads.configure_threads() == 2
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("GGPRIOR_THREADS")
        assert 1 <= threads.configure_threads(adapt=False) == threads.available_cpus()
        with pytest.raises(ValueError):
            threads.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option_and_env(monkeypatch):
    """The root callback configures threads once at CLI start: --threads wins over GGPRIOR_THREADS."""
    from typer.testing import CliRunner

    from ggprior.cli import app

    before = torch.get_num_threads()
    runner = CliRunner()
    try:
        monkeypatch.delenv("GGPRIOR_THREADS", raising=False)
        torch.set_num_threads(2)
        res = runner.invoke(app, ["--threads", "1", "fit"])  # no SOURCE: fails after the callback ran
        assert "missing SOURCE" in res.output
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("GGPRIOR_THREADS", "2")
        runner.invoke(app, ["fit"])
        assert torch.get_num_threads() == 2
        runner.invoke(app, ["--threads", "1", "fit"])
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("GGPRIOR_THREADS", "zero")
        res = runner.invoke(app, ["fit"])
        assert res.exit_code == 1 and "GGPRIOR_THREADS" in res.output
        assert runner.invoke(app, ["--threads", "0", "fit"]).exit_code == 2  # typer's own range check
    finally:
        torch.set_num_threads(before)


def test_library_import_leaves_threads_alone():
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); import ggprior, ggprior.stats, ggprior.deepshape, ggprior.cli; "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
