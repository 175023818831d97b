"""Escape coding of the trellis index tails (ggprior.codec.trellis_payload): payloads written before it still
decode, exact round trips with and without outliers, the size it saves, and damaged escape fields."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import ggprior.gg
from ggprior.codec import trellis as T
from ggprior.codec import trellis_payload as P
from ggprior.codec.bits import CodingError

GOLDEN = Path(__file__).parent.parent / "golden" / "trellis_legacy.json"


def _gg(n: int, gamma: float, seed: int = 0) -> np.ndarray:
    return ggprior.gg.sample((n,), beta=0.02, gamma=gamma, generator=torch.Generator().manual_seed(seed)).double().numpy()


def _outliers(n: int, seed: int = 0, every: int = 5000) -> np.ndarray:
    """GG gamma 0.5 with every ``every``-th value 1000 times larger (random signs)."""
    x = _gg(n, 0.5, seed)
    x[::every] = 1000 * 0.02 * np.where(np.random.default_rng(seed).random(x[::every].size) < 0.5, -1, 1)
    return x


def _round_trip(dq: T.DQ) -> bytes:
    p = T.encode(dq)
    back = T.decode(p, dq.indices.size, "w")
    assert np.array_equal(back.indices, dq.indices) and np.array_equal(back.states, dq.states)
    assert back.step == dq.step and back.n_states == dq.n_states
    return p


def _escaped(p: bytes) -> bool:
    return bool(p[0] & P.ESCAPE)


# ----------------------------------------------------------------------------- format compatibility


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["payloads"], ids=lambda c: f"n{c['n']}")
def test_payloads_written_before_escape_coding_decode_as_before(case):
    """tests/golden/trellis_legacy.json: payloads of the encoder before escape coding (a 3-outlier GG tensor, a
    4-state one at prob_bits 12, all zeros, one value) decode to the same indices; ``escape=False`` at their
    prob_bits still writes those bytes."""
    p = bytes.fromhex(case["payload"])
    dq = T.decode(p, case["n"], "w")
    assert zlib.crc32(dq.indices.astype("<i4").tobytes()) == case["indices_crc32"]
    assert dq.n_states == case["states"] and dq.step == case["step"]
    assert int(np.abs(dq.indices).max()) == case["max_abs_index"]
    assert T.encode(dq, case["prob_bits"], escape=False) == p
    assert np.array_equal(T.decode(T.encode(dq), case["n"]).indices, dq.indices)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n_states", sorted(T.TRELLISES))
@pytest.mark.parametrize("n", [6000, T.CHUNK + 11])
def test_outliers_round_trip_through_the_escape_stream(n_states, n):
    dq = T.quantize(_outliers(n, seed=n, every=1000), 0.002, n_states=n_states)
    p = _round_trip(dq)
    assert _escaped(p)
    e, _, esc0, esc1, _ = P.ESC.unpack_from(p, P.HEAD.size)
    assert 1 <= e < int(np.abs(dq.indices).max())
    assert esc0 + esc1 == int((np.abs(dq.indices) > e).sum()) >= n // 1000


def test_a_tensor_without_outliers_keeps_the_original_layout():
    dq = T.quantize(_gg(1 << 16, 2.0), 0.004, n_states=8)
    p = _round_trip(dq)
    assert not _escaped(p)
    assert len(p) <= len(T.encode(dq, 16, escape=False))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 40])
def test_tiny_and_all_zero_tensors_round_trip(n):
    for x in (np.zeros(n), _outliers(n, seed=n, every=3)):
        for n_states in T.TRELLISES:
            _round_trip(T.quantize(x, 0.01, n_states=n_states))


def test_escape_is_smaller_than_the_full_alphabet_on_outliers():
    """An outlier-heavy tensor (K 10^4): the chosen payload beats the best one without escape (E = K, prob_bits
    chosen too) by 0.3 bit/weight, its side information shrinks 8-fold, and every fixed (escape, prob_bits)
    choice is no smaller than the writer's pick (its estimate is the ideal code length: a few bytes of slack)."""
    dq = T.quantize(_outliers(1 << 17, seed=1), 0.001, n_states=8)
    p, full = T.encode(dq), T.encode(dq, escape=False)
    assert _escaped(p) and not _escaped(full)
    assert 8 * (len(full) - len(p)) / dq.indices.size > 0.25
    assert T.side_bytes(p) < T.side_bytes(full) / 8
    fixed = [len(T.encode(dq, pb, escape=e)) for pb in (16, 14, 13, 12) for e in (True, False)]
    assert len(p) <= min(fixed) + 8


def test_prob_bits_are_checked():
    dq = T.quantize(_gg(100, 1.0), 0.01)
    for pb in (7, 17, 12.0, True):
        with pytest.raises(CodingError, match="prob_bits"):
            T.encode(dq, pb)
    assert T.encode(dq, np.int64(12)) == T.encode(dq, 12)


# ----------------------------------------------------------------------------- damaged escape fields

_X = _outliers(20000, seed=5, every=500)
_DQ = T.quantize(_X, 0.002, n_states=8)
_P = T.encode(_DQ)
_E, _ORDER, _ESC0, _ESC1, _LS = P.ESC.unpack_from(_P, P.HEAD.size)
_K = struct.unpack_from("<I", _P, 5)[0]


def _with_esc(**kw) -> bytes:
    f = {"e": _E, "order": _ORDER, "esc0": _ESC0, "esc1": _ESC1, "ls": _LS, **kw}
    block = P.ESC.pack(f["e"], f["order"], f["esc0"], f["esc1"], f["ls"])
    return _P[:P.HEAD.size] + block + _P[P.HEAD.size + P.ESC.size:]


def test_the_damage_fixture_uses_escapes():
    assert _escaped(_P) and _ESC0 > 0 and _ESC1 > 0 and _LS > 0 and _E < _K


@pytest.mark.parametrize(("kw", "match"), [
    ({"e": 0}, "escape bound"), ({"e": _K + 1}, "escape bound"), ({"e": 2**32 - 1}, "escape bound"),
    ({"order": 25}, "order"), ({"esc0": 20001}, "escapes"), ({"esc1": 2**64 - 1}, "escapes"),
    ({"e": _K}, "escapes"), ({"ls": 2**64 - 1}, "escape stream"), ({"ls": _LS + 10**6}, "escape stream"),
    ({"esc0": _ESC0 + 1, "esc1": _ESC1 - 1}, "escapes"), ({"esc0": _ESC0 - 1}, ""),
    ({"e": _E + 1}, ""), ({"order": (_ORDER + 1) % 25}, ""), ({"ls": _LS - 1}, ""),
])
def test_bad_escape_fields_are_refused(kw, match):
    with pytest.raises(CodingError, match=f"^w: .*{match}"):
        T.decode(_with_esc(**kw), _X.size, "w")


def test_truncated_or_foreign_escape_payloads_are_refused():
    for cut in (P.HEAD.size + 3, P.HEAD.size + P.ESC.size, P.HEAD.size + P.ESC.size + _LS - 1, len(_P) - 1):
        with pytest.raises(CodingError, match="^w: "):
            T.decode(_P[:cut], _X.size, "w")
    # a shorter escape stream with the rest intact: its length and the class sections no longer line up
    cut = P.HEAD.size + P.ESC.size + _LS - 1
    with pytest.raises(CodingError, match="^w: "):
        T.decode(_with_esc(ls=_LS - 1)[:cut] + _P[cut + 1:], _X.size, "w")
    # an index range below the largest escaped magnitude (K itself: the largest |k|)
    low = _P[:5] + struct.pack("<I", _K - 1) + _P[9:]
    with pytest.raises(CodingError, match="^w: .*beyond the index range"):
        T.decode(low, _X.size, "w")
    # the escape flag on a payload of the original layout, and off on an escape payload
    plain = T.encode(_DQ, escape=False)
    for bad in (bytes([plain[0] | P.ESCAPE]) + plain[1:], bytes([_P[0] & ~P.ESCAPE]) + _P[1:]):
        with pytest.raises(CodingError, match="^w: "):
            T.decode(bad, _X.size, "w")


def test_a_count_beyond_int64_is_a_coding_error():
    """A u64 field >= 2^63 (class count, escape count) is refused with CodingError, in both layouts (the reader
    before escape coding raised OverflowError on a class count)."""
    legacy = bytearray(bytes.fromhex(json.loads(GOLDEN.read_text())["payloads"][0]["payload"]))
    legacy[P.HEAD.size + 7] = 0xFF  # top byte of class 0's count
    with pytest.raises(CodingError, match="^w: .*claims"):
        T.decode(bytes(legacy), 2000, "w")
    with pytest.raises(CodingError, match="^w: .*escapes"):
        T.decode(_with_esc(esc0=2**63), _X.size, "w")


# ----------------------------------------------------------------------------- in a .ggz file


def test_file_with_outliers_stores_escape_payloads(tmp_path):
    from fuzz_ggz import check_damage
    from ggprior.codec import load_compressed, read_header, save_compressed
    from ggprior.codec.container import Reader

    w = torch.from_numpy(_outliers(300 * 400, seed=7, every=997)).float().reshape(300, 400)
    h = save_compressed({"w": w}, tmp_path / "t.ggz", trellis=True, step=0.002, chunk_values=50_000)
    (e,) = h["tensors"]
    assert e["encoding"] == "trellis"
    with Reader(tmp_path / "t.ggz") as r:
        assert all(_escaped(r.stream(c, "w")) for c in e["chunks"])
    flat = w.reshape(-1)
    want = np.concatenate([T.quantize(flat[a:a + 50_000], e["step"], n_states=e["states"]).values()
                           for a in range(0, flat.numel(), 50_000)])
    assert torch.equal(load_compressed(tmp_path / "t.ggz")["w"], torch.from_numpy(want).float().reshape(300, 400))
    assert read_header(tmp_path / "t.ggz")["metadata"]["coder"] == "trellis"
    check_damage(tmp_path / "t.ggz", [("flip", i * 7919, i) for i in range(30)] + [("truncate", 4000, 0)])
