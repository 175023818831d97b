"""Per-row steps in the .ggz file (``per_row=True``, ``--per-row``) and whole-file target sizes
(``target_size``, ``--target-size``): round trips, the rule met, validation on read, bad input."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.codec import container
from ggprior.codec import quantizer as quant
from ggprior.codec.container import ContainerError, load_compressed, load_integers, read_header, save_compressed
from ggprior.io import parse_size


def _model() -> dict[str, torch.Tensor]:
    """Rows of very different scales (where one step per tensor is far from one step per row), a bias, a bf16 3-D tensor."""
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(40, 33, generator=g) * torch.logspace(-3, 0, 40)[:, None],
            "b": torch.randn(40, generator=g) * 0.1,
            "conv": (torch.randn(6, 4, 5, generator=g) * 0.02).bfloat16(),
            "ids": torch.arange(7)}


def _row_errors(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    x, y = w.double().reshape(w.shape[0], -1), d.double().reshape(w.shape[0], -1)
    return (x - y).norm(dim=1) / x.norm(dim=1)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), rel=st.floats(1e-3, 0.2), seed=st.integers(0, 2**16),
       spread=st.floats(0, 8))
def test_row_steps_meet_the_relative_error_of_every_row(rows, cols, rel, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-spread, 0, rows)[:, None]
    w[0] = 0.0
    steps = quant.row_steps_for_rel_error(w, rel)
    assert steps.dtype == np.float32 and steps.shape == (rows,)
    assert np.all(steps.view(np.uint32) & 0xFFFF == 0) and steps[0] == 1.0  # bfloat16 values; a zero row gets 1
    s = torch.from_numpy(steps.astype(np.float64))[:, None]
    err = _row_errors(w, quant.dequantize(quant.quantize(w, s), s))
    assert bool((err[1:] <= rel * (1 + 1e-9)).all()), (err, rel)
    assert np.array_equal(quant.row_steps_from_patterns(quant.row_step_patterns(steps)), steps)


def test_per_row_round_trip_is_chunked_parallel_and_meets_the_rule(tmp_path):
    sd = _model()
    files = [tmp_path / f"{j}.ggz" for j in (1, 3)]
    for p, jobs in zip(files, (1, 3), strict=True):
        h = save_compressed(sd, p, per_row=True, rel_error=0.004, chunk_values=37, jobs=jobs)  # chunks split rows
    assert files[0].read_bytes() == files[1].read_bytes()
    entries = {e["name"]: e for e in h["tensors"]}
    assert h["metadata"]["step_rule"] == "rel_error=0.004 per-row"
    assert "step" not in entries["w"] and entries["w"]["row_steps"]["width"] <= quant.ROW_STEP_BITS
    assert "row_steps" not in entries["b"] and isinstance(entries["b"]["step"], float)  # one row: one step
    back, ints = load_compressed(files[0]), load_integers(files[0])
    for k in ("w", "conv"):
        q, steps = ints[k]
        want = quant.row_steps_for_rel_error(sd[k], 0.004)
        assert torch.equal(steps, torch.from_numpy(want.astype(np.float64)))
        s = steps.reshape(-1, *([1] * (q.dim() - 1)))
        assert torch.equal(q, quant.quantize(sd[k], s))
        assert torch.equal(back[k], quant.dequantize(q, s, sd[k].dtype))
    assert bool((_row_errors(sd["w"], back["w"]) <= 0.004).all())
    one = _row_errors(sd["w"], load_compressed(_plain(sd, tmp_path))["w"])
    assert float(one.max()) > 0.1  # one step per tensor: the small rows lose almost everything
    assert torch.equal(back["ids"], sd["ids"])


def _plain(sd: dict, tmp_path: Path) -> Path:
    save_compressed(sd, tmp_path / "plain.ggz", rel_error=0.004)
    return tmp_path / "plain.ggz"


def test_per_row_takes_only_a_relative_error(tmp_path):
    p = tmp_path / "x.ggz"
    for kwargs, msg in [({"bits": 8}, "not step or bits"), ({"step": 0.1}, "not step or bits"),
                        ({"target_bits": 4.0}, "takes no"), ({"lossless": True}, "takes no")]:
        with pytest.raises(ContainerError, match=msg):
            save_compressed(_model(), p, per_row=True, **kwargs)
        assert not p.exists()


def _split(data: bytes) -> tuple[dict, bytes]:
    hlen = container.PREFIX.unpack(data[: container.PREFIX.size])[2]
    return json.loads(data[container.PREFIX.size : container.PREFIX.size + hlen]), data[container.PREFIX.size + hlen :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return container.PREFIX.pack(container.MAGIC, container.VERSION, len(h), zlib.crc32(h)) + h + body


@pytest.mark.parametrize("field, value, msg", [
    ("width", 0, "invalid row_steps parameters"),
    ("width", 17, "invalid row_steps parameters"),
    ("qmin", 0, "invalid row_steps parameters"),
    ("qmin", 0x7F80, "invalid row_steps parameters"),
    ("length", 3, "need|overlaps"),
    ("crc32", 1, "checksum"),
    ("step", 0.5, "no step"),
    ("qmin", 0x7F7F, "row step patterns"),  # patterns past 0x7F7F: an infinite or NaN step
])
def test_row_steps_are_validated_on_read(tmp_path, field, value, msg):
    header, body = _split(_good(tmp_path))
    e = next(e for e in header["tensors"] if e["name"] == "w")
    (e if field == "step" else e["row_steps"])[field] = value
    p = tmp_path / "bad.ggz"
    p.write_bytes(_join(header, body))
    with pytest.raises(ContainerError, match=msg):
        load_compressed(p)


def _good(tmp_path: Path) -> bytes:
    save_compressed(_model(), tmp_path / "good.ggz", per_row=True)
    return (tmp_path / "good.ggz").read_bytes()


def test_row_steps_need_a_matrix(tmp_path):
    header, body = _split(_good(tmp_path))
    e = next(e for e in header["tensors"] if e["name"] == "w")
    e["shape"] = [e["shape"][0] * e["shape"][1]]
    p = tmp_path / "bad.ggz"
    p.write_bytes(_join(header, body))
    with pytest.raises(ContainerError, match="2\\+ dimensions"):
        load_compressed(p)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_rewritten_row_steps_fail_cleanly(tmp_path_factory, data):
    """A header rewritten with a valid checksum is another file (as a rewritten ``step``): loading it gives a
    ContainerError or tensors of the stated shapes, never another exception."""
    d = tmp_path_factory.mktemp("rows")
    good = _good(d)
    header, body = _split(good)
    r = next(e for e in header["tensors"] if e["name"] == "w")["row_steps"]
    key = data.draw(st.sampled_from(["qmin", "width", "offset", "length", "crc32"]))
    r[key] = data.draw(st.one_of(st.integers(-3, 2**33), st.none(), st.text(max_size=3), st.floats()))
    p = d / "m.ggz"
    p.write_bytes(_join(header, body))
    try:
        out = load_compressed(p)
    except ContainerError:
        return
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in _model().items()}


def _synthetic() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(128, 256, generator=g) * (0.01 * (i + 1)) for i in range(4)}
    return {**sd, "t4": torch.randn(512, generator=g), "ids": torch.arange(100)}


@pytest.mark.parametrize("size", [75_000, "150KB", "0.25MiB"])
def test_target_size_lands_within_one_percent_under(tmp_path, size):
    p = tmp_path / "s.ggz"
    h = save_compressed(_synthetic(), p, target_size=size, files={"config.json": b"{}" * 300})
    want = parse_size(size)
    assert 0.99 * want <= p.stat().st_size == h["file_bytes"] <= want
    assert h["metadata"]["step_rule"] == f"target_size={size}"
    back = load_compressed(p)
    assert torch.equal(back["ids"], torch.arange(100))


def test_unreachable_sizes_and_combinations_write_nothing(tmp_path):
    p = tmp_path / "x.ggz"
    for kwargs, err, msg in [
        ({"target_size": 1000}, ContainerError, "target size 1000 .* below the header, raw tensors and side files"),
        ({"target_size": "1GB"}, ContainerError, "target size 1GB .* not below the raw file"),
        ({"target_size": "12XB"}, ValueError, "not a size"),
        ({"target_size": 10**5, "target_bits": 3.0}, ContainerError, "exclude each other"),
        ({"target_size": 10**5, "lossless": True}, ContainerError, "exclude each other"),
        ({"target_size": 10**5, "rel_error": 0.01}, ContainerError, "takes no step"),
        ({"target_size": 10**5, "per_row": True}, ContainerError, "takes no step"),
    ]:
        with pytest.raises(err, match=msg):
            save_compressed(_synthetic(), p, **kwargs)
        assert not p.exists()


def _text(r) -> str:
    return " ".join(r.output.split())


def test_cli_per_row_and_target_size(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file(_synthetic(), str(src))
    run = CliRunner().invoke
    r = run(app, ["compress", str(src), str(tmp_path / "r.ggz"), "--per-row", "--rel-error", "0.01"])
    assert r.exit_code == 0, r.output
    assert read_header(tmp_path / "r.ggz")["metadata"]["step_rule"] == "rel_error=0.01 per-row"
    r = run(app, ["compress", str(src), str(tmp_path / "s.ggz"), "--target-size", "100KB"])
    assert r.exit_code == 0, r.output
    assert 99_000 <= (tmp_path / "s.ggz").stat().st_size <= 100_000
    out = tmp_path / "bad.ggz"
    for args, msg in [(["--target-size", "1KB"], "target size 1KB (1,000 bytes) is below"),
                      (["--target-size", "2GB"], "target size 2GB (2,000,000,000 bytes) is not below the raw file"),
                      (["--target-size", "100KB", "--target-bits", "3"], "give only one of --target-bits, --target-size"),
                      (["--target-size", "100KB", "--rel-error", "0.01"], "--target-size chooses the steps: it takes no --rel-error"),
                      (["--target-size", "100KB", "--lossless"], "it takes no --target-size"),
                      (["--per-row", "--bits", "8"], "--per-row takes --rel-error"),
                      (["--per-row", "--target-bits", "3"], "--target-bits chooses the steps: it takes no --per-row")]:
        r = run(app, ["compress", str(src), str(out), *args])
        assert r.exit_code == 1 and msg in _text(r), (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()


def test_per_row_golden_file_still_reads():
    """A per-row file written once (tests/data; rel_error 0.01 per row, chunks of 100 values cutting rows)
    decodes to the tensors stored beside it."""
    data = Path(__file__).resolve().parents[1] / "data"
    got = load_compressed(data / "v2_rows_ans.ggz")
    want = load_file(str(data / "v2_rows_ans.decoded.safetensors"))
    assert set(got) == set(want) and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert read_header(data / "v2_rows_ans.ggz")["metadata"]["step_rule"] == "rel_error=0.01 per-row"
