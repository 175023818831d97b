"""The .ggz file's lossless tensors (``lossless=True``, ``--lossless``) and target sizes (``target_bits``,
``--target-bits``): round trips, the size met, bad input, and a fuzzed reader for the lossless streams."""

from __future__ import annotations

import json
import zlib
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ggprior.gg
from ggprior.cli import app
from ggprior.codec import container, lossless
from ggprior.codec.allocate import AllocationError
from ggprior.codec.container import ContainerError, load_compressed, read_header, save_compressed
from ggprior.codec.quantizer import QuantError

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
DATA = Path(__file__).parent.parent / "data"
SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-45, 6e-8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _lossless_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {"w.bf16": (torch.randn(40, 30, generator=g) * 0.02).bfloat16(),
          "w.fp16": (torch.randn(257, generator=g) * 0.1).half(),
          "w.fp32": torch.randn(20, 13, generator=g) * 1e-3,
          "w.fp64": torch.randn(5, dtype=torch.float64, generator=g),
          "ids": torch.arange(6), "empty": torch.zeros(0, 3).bfloat16()}
    for k in ("w.bf16", "w.fp16", "w.fp32"):
        sd[k].view(-1)[: len(SPECIALS)] = torch.tensor(SPECIALS).to(sd[k].dtype)
    sd["w.fp16"].view(torch.int16)[-3:] = torch.tensor([0x7E01, -0x0201, 0x0001], dtype=torch.int16)  # NaN payloads, subnormal
    return sd


def test_lossless_round_trip_is_bit_exact_in_every_dtype(tmp_path):
    sd = _lossless_model()
    h = save_compressed(sd, tmp_path / "m.ggz", lossless=True, chunk_values=500)
    enc = {e["name"]: e["encoding"] for e in h["tensors"]}
    assert enc == {"w.bf16": "lossless", "w.fp16": "lossless", "w.fp32": "lossless", "w.fp64": "raw", "ids": "raw",
                   "empty": "raw"}
    assert len(h["tensors"][0]["chunks"]) == 3 and h["metadata"]["step_rule"] == "lossless"
    back = load_compressed(tmp_path / "m.ggz")
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(_bits(back[k]), _bits(t)), k
    assert read_header(tmp_path / "m.ggz")["tensors"][0]["chunks"][0]["n"] == 500



def _golden_model() -> dict[str, torch.Tensor]:
    """The tensors of tests/data/v2_lossless.ggz: :func:`_lossless_model` and fp16 values cast up to fp32."""
    return {**_lossless_model(), "w.fp32lo": (torch.randn(600, generator=torch.Generator().manual_seed(7)) * 0.05)
            .half().float()}


def test_lossless_golden_file_reads_and_old_layout_is_unchanged():
    """A lossless file written before the byte-plane layout (chunks of 300 values) decodes to the tensors stored
    beside it, and its streams are exactly what ``encode_tensor(..., planes=False)`` writes today."""
    path = DATA / "v2_lossless.ggz"
    got, want = load_compressed(path), load_file(str(DATA / "v2_lossless.decoded.safetensors"))
    assert set(got) == set(want) and all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
    ref = _golden_model()
    assert all(torch.equal(_bits(want[k]), _bits(ref[k])) for k in ref)
    header, body = _split(path.read_bytes())
    for e in header["tensors"]:
        flat, start = ref[e["name"]].reshape(-1), 0
        for c in e.get("chunks", []):
            chunk = flat[start : start + c["n"]]
            start += c["n"]
            assert lossless.encode_tensor(chunk, e["dtype"], planes=False) == body[c["offset"] : c["offset"] + c["length"]]


def test_nan_and_inf_under_quantization_name_the_tensor(tmp_path):
    sd = {"ok": torch.randn(8, 8), "bad.weight": torch.randn(8, 8)}
    sd["bad.weight"][2, 3] = float("inf")
    for rule in ({"bits": 8}, {"step": 0.01}, {"rel_error": 0.01}, {"target_bits": 4.0}):
        with pytest.raises(QuantError, match=r"bad\.weight: contains NaN or Inf"):
            save_compressed(sd, tmp_path / "q.ggz", **rule)
        assert not (tmp_path / "q.ggz").exists()
    save_compressed(sd, tmp_path / "l.ggz", lossless=True)
    assert torch.equal(_bits(load_compressed(tmp_path / "l.ggz")["bad.weight"]), _bits(sd["bad.weight"]))


@cache
def _synthetic() -> dict[str, torch.Tensor]:
    specs = [(0.5, 0.002), (1.0, 0.02), (1.5, 0.05), (2.0, 0.03), (0.8, 0.01)]  # (gamma, beta)
    return {f"t{i}": ggprior.gg.sample((64, 256), beta=b, gamma=g, generator=torch.Generator().manual_seed(i))
            for i, (g, b) in enumerate(specs)}


def _quantized_bits(h: dict) -> float:
    q = [e for e in h["tensors"] if e["encoding"] == "quantized"]
    return 8 * sum(container.stored_bytes(e) for e in q) / sum(torch.Size(e["shape"]).numel() for e in q)


@pytest.mark.parametrize("target", [2.0, 4.5])
def test_target_bits_meets_the_size_within_one_percent(tmp_path, target):
    sd = _synthetic()
    h = save_compressed(sd, tmp_path / "t.ggz", target_bits=target)
    assert abs(_quantized_bits(h) / target - 1) < 0.01
    assert h["file_bytes"] == (tmp_path / "t.ggz").stat().st_size and h["metadata"]["step_rule"] == f"target_bits={target:g}"
    steps = [e["step"] for e in h["tensors"]]
    assert len(set(steps)) == len(steps)  # one step per tensor, from the allocation
    back = load_compressed(tmp_path / "t.ggz")
    for e in h["tensors"]:
        assert float((back[e["name"]] - sd[e["name"]]).abs().max()) <= e["step"] / 2 * 1.0001
    # sensitivity weights move bits: the heavily weighted tensor gets a finer step
    hw = save_compressed(sd, tmp_path / "w.ggz", target_bits=target, weights={"t4": 100.0})
    assert abs(_quantized_bits(hw) / target - 1) < 0.01
    assert hw["tensors"][4]["step"] < h["tensors"][4]["step"]


def test_target_bits_with_constant_tensors(tmp_path):
    """Constant tensors (no GG to fit) get an exact step outside the allocation; the total still meets the target."""
    sd = {**_synthetic(), "zeros": torch.zeros(16, 16), "halves": torch.full((300,), 0.5).bfloat16()}
    h = save_compressed(sd, tmp_path / "c.ggz", target_bits=3.0)
    assert abs(_quantized_bits(h) / 3.0 - 1) < 0.01
    back = load_compressed(tmp_path / "c.ggz")
    assert torch.equal(back["zeros"], sd["zeros"]) and torch.equal(back["halves"], sd["halves"])


def test_bad_targets_and_combinations_write_nothing(tmp_path):
    sd, p = _synthetic(), tmp_path / "x.ggz"
    for kwargs, err, msg in [
        ({"target_bits": 0.001}, AllocationError, "side information"),
        ({"target_bits": 32.0}, AllocationError, "raw size"),
        ({"target_bits": 4.0, "coder": "huffman"}, AllocationError, "rANS coder"),
        ({"target_bits": 4.0, "lossless": True}, ContainerError, "exclude each other|takes no"),
        ({"lossless": True, "bits": 8}, ContainerError, "takes no step"),
        ({"target_bits": 4.0, "step": 0.1}, ContainerError, "takes no step"),
        ({"weights": {"t0": 2.0}}, ContainerError, "only with target_bits"),
        ({"target_bits": 4.0, "weights": {"nope": 1.0}}, AllocationError, "does not have"),
    ]:
        with pytest.raises(err, match=msg):
            save_compressed(sd, p, **kwargs)
        assert not p.exists()


def test_target_bits_never_asks_for_a_finer_step_than_the_rans_alphabet(tmp_path, monkeypatch):
    """Near-raw targets used to fail inside the coder ("alphabet ... exceeds"): steps are floored at the finest the
    rANS alphabet allows, and a target beyond what that stores gets a one-line error naming the reachable size."""
    from ggprior.codec import rans

    monkeypatch.setattr(rans, "NSYM_MAX", 64)  # a small alphabet makes the ceiling reachable on a small model
    sd, p = _synthetic(), tmp_path / "a.ggz"
    with pytest.raises(AllocationError, match=r"above what quantized coding stores \(\d+\.\d+ bits/weight.*losslessly"):
        save_compressed(sd, p, target_bits=20.0)
    assert not p.exists()
    h = save_compressed(sd, p, target_bits=3.0)  # reachable: met, and every tensor's alphabet within the cap
    assert abs(_quantized_bits(h) / 3.0 - 1) < 0.01
    for e in h["tensors"]:
        assert e["table"]["nsym"] <= 64


def _text(r) -> str:
    return " ".join(r.output.split())


def test_cli_lossless_and_target_bits(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = {**_synthetic(), "h": _lossless_model()["w.bf16"].clone()}
    save_file(sd, str(src))
    run = CliRunner().invoke
    r = run(app, ["compress", str(src), str(tmp_path / "l.ggz"), "--lossless"])
    assert r.exit_code == 0, r.output
    assert "6 lossless tensors" in _text(r)
    back = load_compressed(tmp_path / "l.ggz")
    assert all(torch.equal(_bits(back[k]), _bits(t)) for k, t in sd.items())
    r = run(app, ["decompress", str(tmp_path / "l.ggz"), str(tmp_path / "back.safetensors")])
    assert r.exit_code == 0, r.output
    back = load_file(str(tmp_path / "back.safetensors"))
    assert all(back[k].dtype == t.dtype and torch.equal(_bits(back[k]), _bits(t)) for k, t in sd.items())
    sd.pop("h")
    save_file(sd, str(src))
    r = run(app, ["compress", str(src), str(tmp_path / "t.ggz"), "--target-bits", "3"])
    assert r.exit_code == 0, r.output
    assert abs(_quantized_bits(read_header(tmp_path / "t.ggz")) / 3 - 1) < 0.01
    out = tmp_path / "bad.ggz"
    for args, msg in [(["--lossless", "--target-bits", "4"], "--lossless stores the exact values: it takes no --target-bits"),
                      (["--lossless", "--bits", "8"], "it takes no --bits"),
                      (["--lossless", "--rel-error", "0.01"], "it takes no --rel-error"),
                      (["--target-bits", "4", "--step", "0.1"], "--target-bits chooses the steps: it takes no --step"),
                      (["--target-bits", "0.0001"], "not above the side information"),
                      (["--target-bits", "40"], "not below the raw size")]:
        r = run(app, ["compress", str(src), str(out), *args])
        assert r.exit_code == 1 and msg in _text(r), (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()


# ---------------------------------------------------------------- the reader, fuzzed on lossless streams


@cache
def _good() -> bytes:
    p = Path(f"/tmp/ggprior-test-lossless-{id(_good)}.ggz")
    save_compressed(_lossless_model(), p, lossless=True, chunk_values=500)
    data = p.read_bytes()
    p.unlink()
    return data


def _split(data: bytes) -> tuple[dict, bytes]:
    hlen = container.PREFIX.unpack(data[: container.PREFIX.size])[2]
    return json.loads(data[container.PREFIX.size : container.PREFIX.size + hlen]), data[container.PREFIX.size + hlen :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return container.PREFIX.pack(container.MAGIC, container.VERSION, len(h), zlib.crc32(h)) + h + body


def _load_or_error(tmp_path_factory, blob: bytes) -> dict | None:
    p = tmp_path_factory.mktemp("ll") / "m.ggz"
    p.write_bytes(blob)
    try:
        return load_compressed(p)
    except ContainerError as e:
        assert str(p) in str(e)
        return None


def _same(got: dict) -> bool:
    ref = _lossless_model()
    return list(got) == list(ref) and all(torch.equal(_bits(got[k]), _bits(ref[k])) for k in ref)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_lossless_streams_damaged_with_valid_checksums_fail_cleanly(tmp_path_factory, data):
    """Bytes of a lossless chunk flipped, cut, inserted (CRC-32 and header fixed up so the lossless decoder itself
    sees them), or its header fields rewritten: ContainerError, or exactly the original tensors."""
    header, body = _split(_good())
    body = bytearray(body)
    chunks = [c for e in header["tensors"] if e["encoding"] == "lossless" for c in e["chunks"]]
    c = chunks[data.draw(st.integers(0, len(chunks) - 1), "chunk")]
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "field"]), "kind")
    if kind == "field":
        key = data.draw(st.sampled_from(["n", "offset", "length", "crc32", "chunks", "dtype", "encoding"]), "key")
        target = c if key in ("n", "offset", "length", "crc32") else next(
            e for e in header["tensors"] if c in e.get("chunks", []))
        target[key] = data.draw(st.one_of(st.integers(-3, 2**41), st.none(), st.text(max_size=4),
                                          st.sampled_from(["float16", "bfloat16", "float32", "float64", "raw",
                                                           "quantized"])), "value")
    else:
        s = bytearray(body[c["offset"] : c["offset"] + c["length"]])
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 4), "n")):
                s[data.draw(st.integers(0, len(s) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del s[data.draw(st.integers(0, len(s) - 1), "at"):]
        else:
            at = data.draw(st.integers(0, len(s)), "at")
            s[at:at] = data.draw(st.binary(min_size=1, max_size=8), "bytes")
        delta = len(s) - c["length"]
        body[c["offset"] : c["offset"] + c["length"]] = s
        for e in header["tensors"]:  # later streams move by delta
            for st_ in e.get("chunks", []) + ([e] if "offset" in e else []):
                if st_["offset"] > c["offset"]:
                    st_["offset"] += delta
        for f in header["files"]:
            if f["offset"] > c["offset"]:
                f["offset"] += delta
        c["length"], c["crc32"] = len(s), zlib.crc32(bytes(s))
        header["data_bytes"] += delta
    got = _load_or_error(tmp_path_factory, _join(header, bytes(body)))
    if got is not None:
        assert _same(got)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lossless_files_mutated_or_truncated_fail_cleanly(tmp_path_factory, data):
    blob = bytearray(_good())
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]), "kind")
    if kind == "flip":
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=8))
    got = _load_or_error(tmp_path_factory, bytes(blob))
    if got is not None:
        assert _same(got)
