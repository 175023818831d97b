import json
import os

import pytest

from ggprior.io.atomic import atomic_path, write_text
from ggprior.io.tables import to_csv, to_markdown, write_table


def test_write_table_round_trip(tmp_path):
    rows = [{"name": "a", "x": 1.23456789, "n": 3}, {"name": "b", "y": float("nan")}]
    files = write_table(rows, tmp_path / "sub", "t", title="T")
    assert json.loads(files["json"].read_text())[0]["x"] == 1.23456789
    assert files["csv"].read_text().splitlines()[0] == "name,x,n,y"
    md = files["md"].read_text()
    assert md.startswith("# T") and "| a | 1.235 | 3 |  |" in md and "nan" in md


def test_markdown_and_csv_column_selection():
    rows = [{"a": 1, "b": 2}]
    assert to_markdown(rows, ["b"]).splitlines()[2] == "| 2 |"
    assert to_csv(rows, ["b"]).splitlines() == ["b", "2"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "f.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_permissions_follow_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "g.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o644
