"""Atomic writes: fsync before the rename, the process umask never touched, clean failures."""

import os
import stat

import pytest

from ggprior.io import atomic
from ggprior.io.atomic import atomic_path, write_bytes


def test_write_is_fsynced_before_the_rename_and_umask_untouched(tmp_path, monkeypatch):
    """Issue 16 item 10: atomic_path never fsynced and flipped the process-wide umask."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def no_umask(mask):
        raise AssertionError("os.umask called: it changes the umask of every thread")

    monkeypatch.setattr(atomic.os, "umask", no_umask)
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_bytes(tmp_path / "f.bin", b"data")
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert calls[:2] == ["fsync", "replace"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_parent_that_is_a_file_is_named(tmp_path):
    """Issue 16 item 8: an output under a file said "[Errno 17] File exists"."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        write_bytes(tmp_path / "afile" / "sub" / "out.bin", b"x")


def test_atomic_dir_follows_the_umask_without_changing_it(tmp_path, monkeypatch):
    from ggprior.io.atomic import atomic_dir

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(atomic.os, "umask", lambda mask: (_ for _ in ()).throw(AssertionError("os.umask called")))
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert (tmp_path / "out" / "f.txt").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["out"]
