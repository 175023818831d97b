"""The .ggz file: round trips, exactness at the quantized level, damaged files, atomic writes."""

import json
import struct
import tracemalloc
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ggprior.codec import container, registry
from ggprior.codec import quantizer as quant
from ggprior.codec.container import ContainerError, load_compressed, load_integers, read_header, save_compressed
from ggprior.codec.lengths import quantized_state_dict


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(48, 32, generator=g) * 0.05,
        "fc.bias": torch.randn(48, generator=g) * 0.01,
        "half.weight": (torch.randn(16, 8, generator=g) * 0.1).half(),
        "norm.weight": (1 + 0.1 * torch.randn(8, generator=g)).bfloat16(),
        "const.weight": torch.zeros(4, 4),
        "empty": torch.zeros(0, 3),
        "position_ids": torch.arange(10).unsqueeze(0),
        "mask": torch.tensor([True, False, True]),
    }


@cache
def _good_file(coder: str) -> bytes:
    path = Path(f"/tmp/ggprior-test-{coder}-{id(_good_file)}.ggz")
    save_compressed(_state_dict(), path, coder=coder, bits=8)
    data = path.read_bytes()
    path.unlink()
    return data


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, hlen, _ = container.PREFIX.unpack(data[: container.PREFIX.size])
    header = json.loads(data[container.PREFIX.size : container.PREFIX.size + hlen])
    return header, data[container.PREFIX.size + hlen :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return container.PREFIX.pack(container.MAGIC, container.VERSION, len(h), zlib.crc32(h)) + h + body


@pytest.mark.parametrize("coder", registry.CODERS)
def test_round_trip_every_coder_equals_quantize_dequantize(tmp_path, coder):
    sd = _state_dict()
    path = tmp_path / "m.ggz"
    header = save_compressed(sd, path, coder=coder, bits=8)
    assert header["file_bytes"] == path.stat().st_size
    out = load_compressed(path)
    ref = quantized_state_dict(sd, bits=8)
    assert list(out) == list(sd)
    for name, t in ref.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(out[name], t), name
    q = load_integers(path)
    for name in ("fc.weight", "half.weight", "norm.weight"):
        ints, step = q[name]
        assert step == quant.step_for_bits(sd[name], 8)
        assert torch.equal(ints, quant.quantize(sd[name], step).long())
    assert "position_ids" not in q and torch.equal(out["position_ids"], sd["position_ids"])


def test_include_matrices_keeps_vectors_exact(tmp_path):
    sd = _state_dict()
    path = tmp_path / "m.ggz"
    save_compressed(sd, path, coder="huffman", step=0.01, include="matrices")
    out = load_compressed(path)
    assert torch.equal(out["fc.bias"], sd["fc.bias"]) and torch.equal(out["norm.weight"], sd["norm.weight"])
    assert not torch.equal(out["fc.weight"], sd["fc.weight"])
    assert float((out["fc.weight"] - sd["fc.weight"]).abs().max()) <= np.float32(0.01) / 2 + 1e-7
    entries = {e["name"]: e for e in read_header(path)["tensors"]}
    assert entries["fc.bias"]["encoding"] == "raw" and entries["fc.weight"]["encoding"] == "quantized"
    assert entries["fc.weight"]["step"] == float(np.float32(0.01))


def test_rel_error_step_and_inspect_rows(tmp_path):
    sd = _state_dict()
    path = tmp_path / "m.ggz"
    save_compressed(sd, path, coder="ans", rel_error=0.02, metadata={"note": "x"})
    header = read_header(path)
    assert header["metadata"]["note"] == "x" and header["metadata"]["step_rule"] == "rel_error=0.02"
    out = load_compressed(path)
    err = float((out["fc.weight"] - sd["fc.weight"]).norm() / sd["fc.weight"].norm())
    assert err == pytest.approx(0.02, rel=0.05)
    rows = {r["name"]: r for r in container.inspect_rows(path)}
    e = next(e for e in header["tensors"] if e["name"] == "fc.weight")
    assert rows["fc.weight"]["bits_per_weight"] == 8 * container.stored_bytes(e) / (48 * 32)
    assert rows["fc.weight"]["gg_beta"] == pytest.approx(e["gg"][1] * e["step"])
    assert rows["mask"]["coder"] == "raw"


def test_save_errors_name_the_tensor(tmp_path):
    with pytest.raises(quant.QuantError, match="bad.weight: contains NaN"):
        save_compressed({"bad.weight": torch.tensor([1.0, float("nan")])}, tmp_path / "x.ggz", bits=8)
    with pytest.raises(registry.CodingError, match="unknown coder"):
        save_compressed(_state_dict(), tmp_path / "x.ggz", coder="zip")
    with pytest.raises(ContainerError, match="c.weight.*unsupported dtype"):
        save_compressed({"c.weight": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.ggz")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_on_failure_midway(tmp_path, monkeypatch, existing):
    """A write that fails after some bytes leaves the old file (or none) and no temporary file."""
    path = tmp_path / "m.ggz"
    if existing:
        save_compressed(_state_dict(), path, coder="eg", bits=8)
    before = path.read_bytes() if existing else None
    real_open = open

    class FailingFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n == 3:  # prefix and header written, then the disk fills up
                raise OSError("disk full")
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(p, mode="r", *a, **k):
        f = real_open(p, mode, *a, **k)
        return FailingFile(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(_state_dict(), path, coder="huffman", bits=6)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["m.ggz"] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_clear_errors_for_common_damage(tmp_path):
    good = _good_file("ans")
    cases = {
        "not a .ggz file": b"PK\x03\x04" + good[4:],
        "too short": good[:10],
        "unsupported .ggz version": good[:8] + struct.pack("<I", 4) + good[12:],
        "header checksum": good[:40] + bytes([good[40] ^ 1]) + good[41:],
        "truncated or padded": good[:-1],
        "stream checksum": good[:-5] + bytes([good[-5] ^ 0x10]) + good[-4:],
        "exceeds the": good[:12] + struct.pack("<I", container.HEADER_MAX + 1) + good[16:],
    }
    for i, (msg, data) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.ggz"
        p.write_bytes(data)
        with pytest.raises(ContainerError, match=msg) as exc:
            load_compressed(p)
        assert str(p) in str(exc.value)
    with pytest.raises(ContainerError, match="cannot open"):
        load_compressed(tmp_path / "missing.ggz")


@pytest.mark.parametrize("field,value,msg", [
    ("shape", [10**30, 0], "invalid shape"),
    ("shape", [2**20, 2**20, 2**20], "exceed the limit"),
    ("shape", [1] * 9, "at most 8 dimensions"),
    ("shape", [48, 33], "chunks hold"),
    ("chunk.offset", 10**9, "overlaps or leaves a gap|streams end"),
    ("chunk.length", -1, "invalid chunk length"),
    ("chunk.n", 0, "invalid chunk"),
    ("chunk.n", container.CHUNK_MAX + 1, "invalid chunk"),
    ("dtype", "complex", "unsupported dtype"),
    ("coder", "zip", "unknown coder"),
    ("step", 0.0, "step"),
    ("step", "0.1", "step"),
    ("chunk.params", {"qmin": 0}, "invalid chunk parameters"),
    ("table.nsym", 1, "frequency table parameters"),
    ("table.prob_bits", 40, "frequency table parameters"),
    ("gg", [0.0, -1.0, 1.0], "invalid GG"),
    ("encoding", "gzip", "unknown encoding"),
    ("chunk.qcrc32", 2**33, "invalid chunk qcrc32"),
    ("name", "", "not a non-empty string"),
    ("name", 7, "not a non-empty string"),
])
def test_header_fields_are_validated(tmp_path, field, value, msg):
    header, body = _split(_good_file("ans"))
    e = next(e for e in header["tensors"] if e["name"] == "fc.weight")
    where, _, key = field.rpartition(".")
    target = e["chunks"][0] if where == "chunk" else e["table"] if where == "table" else e
    target[key] = value
    p = tmp_path / "bad.ggz"
    p.write_bytes(_join(header, body))
    with pytest.raises(ContainerError, match=msg):
        load_compressed(p)


def test_overlapping_and_duplicate_streams(tmp_path):
    header, body = _split(_good_file("eg"))
    header["tensors"][1]["chunks"][0]["offset"] = header["tensors"][0]["chunks"][0]["offset"]
    p = tmp_path / "bad.ggz"
    p.write_bytes(_join(header, body))
    with pytest.raises(ContainerError, match="overlap"):
        load_compressed(p)
    header, body = _split(_good_file("eg"))
    header["tensors"][1]["name"] = header["tensors"][0]["name"]
    p.write_bytes(_join(header, body))
    with pytest.raises(ContainerError, match="duplicate"):
        load_compressed(p)


def _load_bounded(p: Path, size: int) -> dict | None:
    """Load ``p``; return None on ContainerError; check NumPy allocations stay proportional to the file."""
    tracemalloc.start()
    try:
        return load_compressed(p)
    except ContainerError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < (1 << 25) + 256 * size, f"{peak} bytes allocated for a {size}-byte file"


@pytest.mark.parametrize("coder", registry.CODERS)
@given(data=st.data())
def test_mutated_or_truncated_files_fail_cleanly(tmp_path_factory, coder, data):
    good = bytearray(_good_file(coder))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "append"]), "kind")
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8), "n")):
            good[data.draw(st.integers(0, len(good) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        good = good[: data.draw(st.integers(0, len(good) - 1), "cut")]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(good)), "at")
        good[at:at] = data.draw(st.binary(min_size=1, max_size=16), "bytes")
    else:
        good += data.draw(st.binary(min_size=1, max_size=16), "bytes")
    p = tmp_path_factory.mktemp("fuzz") / "m.ggz"
    p.write_bytes(bytes(good))
    out = _load_bounded(p, len(good))
    if out is not None:  # only a mutation that cancels out may load, and then it decodes the original
        ref = load_compressed_bytes(_good_file(coder), tmp_path_factory)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def load_compressed_bytes(data: bytes, factory) -> dict:
    p = factory.mktemp("ref") / "ref.ggz"
    p.write_bytes(data)
    return load_compressed(p)


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8),
    st.lists(st.integers(-5, 2**45), max_size=9), st.dictionaries(st.sampled_from(["qmin", "nsym", "k", "width",
                                                                                    "table_bytes"]),
                                                                   st.integers(-(2**41), 2**41)),
)


@pytest.mark.parametrize("coder", registry.CODERS)
@given(data=st.data())
def test_rewritten_headers_with_valid_checksum_fail_cleanly(tmp_path_factory, coder, data):
    header, body = _split(_good_file(coder))
    for _ in range(data.draw(st.integers(1, 3), "n")):
        e = header["tensors"][data.draw(st.integers(0, len(header["tensors"]) - 1), "tensor")]
        key = data.draw(st.sampled_from(["shape", "offset", "length", "params", "step", "gg", "qcrc32", "crc32",
                                         "dtype", "encoding", "coder", "n", "chunks", "table", "of"]), "key")
        chunks = e["chunks"] if isinstance(e.get("chunks"), list) else []
        inner = [c for c in chunks if isinstance(c, dict)] + ([e["table"]] if isinstance(e.get("table"), dict) else [])
        if key in ("offset", "length", "params", "qcrc32", "crc32", "n") and inner and data.draw(st.booleans()):
            e = inner[data.draw(st.integers(0, len(inner) - 1), "inner")]
        if key == "params" and isinstance(e.get("params"), dict) and e["params"] and data.draw(st.booleans()):
            e["params"][data.draw(st.sampled_from(sorted(e["params"])))] = data.draw(st.integers(-(2**41), 2**41))
        else:
            e[key] = data.draw(json_values, "value")
    if data.draw(st.booleans(), "data_bytes"):
        header["data_bytes"] = data.draw(json_values)
    blob = _join(header, body)
    p = tmp_path_factory.mktemp("hdr") / "m.ggz"
    p.write_bytes(blob)
    _load_bounded(p, len(blob))  # a ContainerError or a state dict, nothing else
