"""Channel scales: step codes from the Fisher's row and column means, the scaled tensors in a ``.ggz`` (version 3),
their reader checks, and the weighted distortion they save."""

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from ggprior.codec import (
    ContainerError,
    container,
    inspect_rows,
    load_compressed,
    load_integers,
    read_header,
    save_compressed,
)
from ggprior.codec import channels as ch
from ggprior.codec.bits import CodingError
from ggprior.codec.sensitivity import sensitivity_weights

fisher = hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0, 1e6) | st.floats(1e-12, 1e-6))


def test_codes_follow_the_inverse_square_root_of_the_fisher():
    # f = 1, 4, 16, 64: steps ~ f^(-1/2) are 1, 1/2, 1/4, 1/8: one octave (8 codes) apart, centred on their mean
    s = ch.channel_scales(np.array([1.0, 4.0, 16.0, 64.0]), np.ones(3), finer=8, coarser=8)
    assert s.rows.tolist() == [12, 4, -4, -12] and s.cols.tolist() == [0, 0, 0]
    clamped = ch.channel_scales(np.array([1.0, 4.0, 16.0, 64.0]), np.ones(3), finer=1, coarser=0.5)
    assert clamped.rows.tolist() == [4, 4, -4, -8]
    u, _ = clamped.factors()
    assert u.tolist() == [2**0.5, 2**0.5, 2**-0.5, 0.5]


@given(fisher, st.floats(0, 8), st.floats(0, 8))
def test_codes_stay_in_their_clamps_and_fall_as_the_fisher_rises(f, finer, coarser):
    s = ch.channel_scales(f, f, finer=finer, coarser=coarser)
    assert s.rows.min() >= -round(8 * finer) and s.rows.max() <= round(8 * coarser)
    assert np.abs(s.rows).max() <= ch.CODE_MAX
    pos = f > 0
    order = np.argsort(f[pos], kind="stable")
    assert np.all(np.diff(s.rows[pos][order]) <= 0)  # more sensitive, finer (never coarser) step
    if pos.any() and (~pos).any():  # no evidence: the mean sensitivity's code
        mean = ch.channel_scales(np.where(pos, f, f[pos].mean()), f, finer=finer, coarser=coarser)
        assert s.rows.tolist() == mean.rows.tolist()


def test_only_tensors_large_enough_for_their_codes_are_worth_scaling():
    assert ch.worth_scaling((576, 1536)) and ch.worth_scaling((64, 64)) and ch.worth_scaling((128, 3, 4, 4))
    assert not ch.worth_scaling((2, 384)) and not ch.worth_scaling((63, 63)) and not ch.worth_scaling((4096,))
    assert not ch.worth_scaling((6, 3, 64, 64))  # 12288 column codes for 73728 values


def test_a_tensor_without_fisher_is_not_scaled_and_clamps_are_checked():
    s = ch.channel_scales(np.zeros(4), np.zeros(5))
    assert s.rows.tolist() == [0] * 4 and s.cols.tolist() == [0] * 5
    assert ch.weight_factor(s, np.zeros(4), np.zeros(5)) == 1.0
    with pytest.raises(ValueError, match="clamps"):
        ch.channel_scales(np.ones(2), np.ones(2), finer=9)


@given(hnp.arrays(np.float64, 6, elements=st.floats(1e-3, 1e3)), hnp.arrays(np.float64, 5, elements=st.floats(1e-3, 1e3)))
def test_weight_factor_is_the_elementwise_mean_under_a_rank_one_fisher(r, c):
    s = ch.channel_scales(r, c)
    u, v = (x.numpy() for x in s.factors())
    f = np.outer(r, c)
    want = (f * np.outer(u, v) ** 2).mean() / f.mean()
    assert ch.weight_factor(s, r, c) == pytest.approx(want, rel=1e-12)


def test_sensitivity_per_channel_is_the_fisher_of_a_linear_layer():
    # a Gaussian probe on y = W x: the Fisher of W_ij is x_j^2, whatever i: rows all mean(x^2), columns x_j^2
    torch.manual_seed(0)
    lin = nn.Linear(3, 4, bias=False)
    x = torch.tensor([0.5, -1.0, 2.0])
    got = sensitivity_weights(lin, [x.expand(6, 3).clone() for _ in range(400)], kind="fisher", per_channel=True)
    rows, cols = got["weight"]
    assert rows.shape == (4,) and cols.shape == (3,)
    np.testing.assert_allclose(cols, 6 * x.pow(2).numpy(), rtol=0.15)
    np.testing.assert_allclose(rows, 6 * float(x.pow(2).mean()), rtol=0.15)
    assert rows.mean() == pytest.approx(cols.mean())


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(48, 64, generator=g) * torch.linspace(0.2, 2.0, 64), "bias": torch.randn(48, generator=g),
            "conv": torch.randn(6, 3, 2, 2, generator=g)}


def _scales() -> dict[str, ch.ChannelScales]:
    rng = np.random.default_rng(0)
    return {"a": ch.ChannelScales(rng.integers(-16, 5, 48), rng.integers(-16, 5, 64)),
            "conv": ch.ChannelScales(rng.integers(-3, 3, 6), rng.integers(-16, 5, 12))}


@pytest.mark.parametrize("rule", [{"rel_error": 0.02}, {"bits": 6}, {"target_bits": 4.0}, {"target_size": 2600},
                                  {"target_bits": 4.0, "trellis": True}, {"rel_error": 0.02, "trellis": True}])
def test_round_trip_decodes_the_integers_times_their_channel_steps(tmp_path, rule):
    sd, scales = _model(), _scales()
    h = save_compressed(sd, tmp_path / "m.ggz", channel_scales=scales, **rule)
    assert h["version"] == 3 and read_header(tmp_path / "m.ggz")["version"] == 3
    assert h["metadata"]["channel_scales"] == "2 tensors"
    back = load_compressed(tmp_path / "m.ggz")
    entries = {e["name"]: e for e in h["tensors"]}
    assert "channel_scales" in entries["a"] and "channel_scales" not in entries["bias"]
    for k, t in sd.items():
        assert back[k].shape == t.shape and bool(torch.isfinite(back[k]).all())
    for k, (q, steps) in load_integers(tmp_path / "m.ggz").items():  # scalar entries: q * (step u_i v_j)
        assert torch.equal((q.double() * steps).float(), back[k])
    for k, s in scales.items():
        e = entries[k]
        u, v = s.factors()
        per = (e["step"] * u[:, None] * v[None, :]).reshape(sd[k].shape)
        err = (back[k].double() - sd[k].double()).abs() / per
        assert float(err.max()) <= (0.5 + 1e-6 if e["encoding"] == "quantized" else 4.0)
    if "target_bits" in rule:
        q = [e for e in h["tensors"] if e["encoding"] in ("quantized", "trellis")]
        bits = 8 * sum(container.stored_bytes(e) for e in q) / sum(math.prod(e["shape"]) for e in q)
        assert bits == pytest.approx(rule["target_bits"], rel=0.01)  # the scales' bytes counted in the target
    if "target_size" in rule:
        assert h["file_bytes"] <= rule["target_size"]
    assert {r["name"]: r["coder"].endswith("channel-scaled") for r in inspect_rows(tmp_path / "m.ggz")} == {
        "a": True, "bias": False, "conv": True}


def test_without_scales_the_file_stays_version_2(tmp_path):
    h = save_compressed(_model(), tmp_path / "m.ggz", target_bits=4.0)
    assert h["version"] == 2 and all("channel_scales" not in e for e in h["tensors"])


def test_scales_of_a_raw_tensor_are_not_used_and_bad_scales_are_refused(tmp_path):
    sd, out = _model(), tmp_path / "m.ggz"
    h = save_compressed(sd, out, include="matrices", channel_scales={"a": _scales()["a"]})
    assert "channel_scales" in {e["name"]: e for e in h["tensors"]}["a"]
    cases = [({"nope": _scales()["a"]}, "does not have"), ({"a": _scales()["conv"]}, "tensor 'a': channel scales for 6 rows"),
             ({"a": ch.ChannelScales(np.full(48, 99), np.zeros(64, int))}, r"\[-64, 64\]")]
    for scales, msg in cases:
        out.unlink(missing_ok=True)
        with pytest.raises(ContainerError, match=msg):
            save_compressed(sd, out, rel_error=0.01, channel_scales=scales)
        assert not out.exists()
    with pytest.raises(ContainerError, match="not lossless"):
        save_compressed(sd, out, lossless=True, channel_scales=_scales())
    with pytest.raises(ContainerError, match="not per_row"):
        save_compressed(sd, out, per_row=True, channel_scales=_scales())
    with pytest.raises(CodingError, match="2\\+ dimensions"):
        ch.ChannelScales(np.zeros(3, int), np.zeros(1, int)).check((3,), "v")


def test_channel_scales_cut_the_weighted_distortion_at_the_same_size(tmp_path):
    # columns whose Fisher spans 8 octaves: steps shaped by it spend the same bits where the output cares
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g)
    cf = np.exp2(np.random.default_rng(1).uniform(-4, 4, 512))
    rf = np.ones(256)
    scales = ch.channel_scales(rf, cf)
    weighted = {}
    for name, kw in (("flat", {}), ("scaled", {"channel_scales": {"w": scales}})):
        save_compressed({"w": w}, tmp_path / f"{name}.ggz", target_bits=4.0, **kw)
        e = (load_compressed(tmp_path / f"{name}.ggz")["w"].double() - w.double()) ** 2
        weighted[name] = float((e * torch.from_numpy(cf)[None, :]).sum())
    assert weighted["scaled"] < 0.8 * weighted["flat"]


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, hlen, _ = container.PREFIX.unpack(data[: container.PREFIX.size])
    return json.loads(data[container.PREFIX.size : container.PREFIX.size + hlen]), data[container.PREFIX.size + hlen :]


def _join(header: dict, body: bytes, version: int) -> bytes:
    h = json.dumps({**header, "version": version}).encode()
    return container.PREFIX.pack(container.MAGIC, version, len(h), zlib.crc32(h)) + h + body


@pytest.fixture(scope="module")
def scaled_file(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("ch") / "m.ggz"
    save_compressed(_model(), p, rel_error=0.05, channel_scales=_scales())
    return p.read_bytes()


def _bad(tmp_path: Path, data: bytes, msg: str) -> None:
    p = tmp_path / "bad.ggz"
    p.write_bytes(data)
    with pytest.raises(ContainerError, match=msg):
        load_compressed(p)


def test_reader_checks_of_the_channel_scales(tmp_path, scaled_file):
    header, body = _split(scaled_file)
    _bad(tmp_path, _join(header, body, 2), "channel_scales in a version 2 file")
    for field, value, msg in [("qmin", 70, "invalid channel_scales parameters"),
                              ("width", 9, "invalid channel_scales parameters"),
                              ("length", 1, "channel_scales stream of 1 bytes")]:
        h = json.loads(json.dumps(header))
        h["tensors"][0]["channel_scales"][field] = value
        _bad(tmp_path, _join(h, body, 3), msg)
    h = json.loads(json.dumps(header))
    h["tensors"][1]["channel_scales"] = h["tensors"][0]["channel_scales"]  # on the 1-D bias
    _bad(tmp_path, _join(h, body, 3), "2\\+ dimensions")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_damaged_channel_scaled_files_fail_cleanly_or_decode_the_original(tmp_path_factory, scaled_file, data):
    good = bytearray(scaled_file)
    for _ in range(data.draw(st.integers(1, 6), "n")):
        good[data.draw(st.integers(0, len(good) - 1))] ^= data.draw(st.integers(1, 255))
    header, body = _split(scaled_file)
    rewrite = data.draw(st.booleans(), "rewrite")
    if rewrite:  # a header rewritten with a valid checksum: its checks, not the stream checksums, must hold
        e = header["tensors"][0]["channel_scales"]
        e[data.draw(st.sampled_from(sorted(e)))] = data.draw(st.integers(-(2**40), 2**40) | st.none() | st.text(max_size=3))
        good = bytearray(_join(header, body, 3))
    p = tmp_path_factory.mktemp("dmg") / "m.ggz"
    p.write_bytes(bytes(good))
    try:
        out = load_compressed(p)
    except ContainerError:
        return
    ref_p = tmp_path_factory.mktemp("ref") / "m.ggz"
    ref_p.write_bytes(scaled_file)
    ref = load_compressed(ref_p)
    if rewrite:  # a valid header may mean other codes (qmin, width): the right shapes, finite values
        assert all(out[k].shape == ref[k].shape and bool(torch.isfinite(out[k]).all()) for k in ref)
    else:  # only a change that cancels out may load, and then it decodes the original
        assert all(torch.equal(out[k], ref[k]) for k in ref)


@given(st.integers(1, 7), st.integers(1, 9), st.data())
def test_expand_is_the_outer_product_of_any_slice(rows, cols, data):
    rng = np.random.default_rng(rows * 10 + cols)
    s = ch.ChannelScales(rng.integers(-16, 5, rows), rng.integers(-16, 5, cols))
    f = s.factors()
    full = (0.37 * f[0][:, None] * f[1][None, :]).reshape(-1)
    lo = data.draw(st.integers(0, rows * cols))
    n = data.draw(st.integers(0, rows * cols - lo))
    assert torch.equal(ch.expand(lo, n, f, 0.37), full[lo:lo + n])
