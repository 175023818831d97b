"""codec/lossless: bit-exact round trips on every dtype (NaN, Inf, subnormals, -0.0) and a fuzzed reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggprior
import ggprior.gg
from ggprior.codec import lossless as L

WIDTH = {"bfloat16": 16, "float16": 16, "float32": 32}


def _special(dt: str) -> np.ndarray:
    """NaNs (quiet, signalling, with payloads), +-Inf, +-0, smallest/largest subnormals and normals."""
    if WIDTH[dt] == 16:
        e = 0x7F80 if dt == "bfloat16" else 0x7C00
        m = 0x007F if dt == "bfloat16" else 0x03FF
        v = [0, 0x8000, e, e | 0x8000, e | 1, e | m, e | 0x8000 | 0x40 & m, 1, m, 0x8001, 0x8000 | m, m + 1, e - 1]
        return np.array(v, dtype=np.uint16)
    v = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 1, 0x007FFFFF,
         0x80000001, 0x00800000, 0x7F7FFFFF]
    return np.array(v, dtype=np.uint32)


def _gg_bits(dt: str, n: int, gamma: float, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    t = ggprior.gg.sample((n,), beta=0.03, gamma=gamma, generator=g)
    t = t.to({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dt])
    return L.as_bits(t, dt)


@pytest.mark.parametrize("dt", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("model", ["auto", "hist", "gg"])
def test_round_trip_gg_with_specials(dt, model):
    a = np.concatenate([_gg_bits(dt, 20_000, 0.8), _special(dt)])
    np.random.default_rng(1).shuffle(a)
    s = L.encode_tensor(a, dt, model=model)
    b = L.decode_tensor(s, dt, a.size)
    assert b.dtype == a.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("dt", ["bfloat16", "float16", "float32"])
def test_every_k_round_trips(dt):
    a = np.concatenate([_gg_bits(dt, 3000, 1.5), _special(dt)])
    for k in range(L.KMAX[dt] + 1):
        s = L.encode_tensor(a, dt, k=k)
        assert L.stream_info(s)["k"] == k
        assert np.array_equal(L.decode_tensor(s, dt, a.size), a)


@pytest.mark.parametrize("dt", ["bfloat16", "float16", "float32"])
def test_all_bit_patterns_and_edge_sizes(dt):
    """Every 16-bit pattern (a sample of 32-bit ones), a single value, a constant tensor, empty."""
    if WIDTH[dt] == 16:
        a = np.arange(1 << 16, dtype=np.uint16)
    else:
        a = np.random.default_rng(0).integers(0, 1 << 32, 50_000, dtype=np.uint64).astype(np.uint32)
    for arr in (a, a[:1], np.full(1000, a[5]), a[:0]):
        s = L.encode_tensor(arr, dt)
        assert np.array_equal(L.decode_tensor(s, dt, arr.size), arr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dt=st.sampled_from(["bfloat16", "float16", "float32"]), data=st.data())
def test_round_trip_property(dt, data):
    n = data.draw(st.integers(0, 300))
    hi = (1 << WIDTH[dt]) - 1
    pool = st.one_of(st.integers(0, hi), st.sampled_from(_special(dt).tolist()))
    vals = data.draw(st.lists(pool, min_size=n, max_size=n))
    a = np.array(vals, dtype=np.uint16 if WIDTH[dt] == 16 else np.uint32)
    s = L.encode_tensor(a, dt)
    assert np.array_equal(L.decode_tensor(s, dt, a.size), a)


def test_torch_and_float_inputs():
    t = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -1.5e-40, 3.0])
    for dt, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        x = t.to(tdt)
        s = L.encode_tensor(x, dt)
        back = torch.from_numpy(L.decode_tensor(s, dt, x.numel()).view(np.int16 if WIDTH[dt] == 16 else np.int32))
        assert torch.equal(back, x.view(torch.int16 if WIDTH[dt] == 16 else torch.int32))
    s = L.encode_tensor(np.array([1.0, -0.0], dtype=np.float32), "fp32")
    assert L.decode_tensor(s, "float32", 2).view(np.float32).tolist() == [1.0, -0.0]


def test_smaller_than_dfloat11_scheme_on_gg_bf16():
    """Exponent + top mantissa bits under a model beat Huffman(exponent) + 8 raw bits."""
    from ggprior.codec.huffman import code_lengths

    a = _gg_bits("bfloat16", 200_000, 1.0)
    ours = 8 * len(L.encode_tensor(a, "bf16"))
    h = np.bincount(((a >> 7) & 0xFF).astype(np.int64), minlength=256)
    dfloat11 = int((code_lengths(h) * h).sum()) + 8 * a.size
    assert ours < dfloat11


def test_gg_model_chosen_for_a_small_gg_tensor():
    a = _gg_bits("bfloat16", 2000, 1.2)
    assert L.stream_info(L.encode_tensor(a, "bf16"))["model"] == "gg"


def test_bad_arguments():
    with pytest.raises(L.LosslessError, match="unsupported dtype"):
        L.encode_tensor(np.zeros(3, np.uint16), "int8")
    with pytest.raises(L.LosslessError, match="16-bit"):
        L.encode_tensor(np.zeros(3, np.uint32), "bf16")
    s = L.encode_tensor(np.arange(100, dtype=np.uint16), "bf16")
    with pytest.raises(L.LosslessError, match="holds bfloat16"):
        L.decode_tensor(s, "float16", 100)
    with pytest.raises(L.LosslessError, match="100 values"):
        L.decode_tensor(s, "bfloat16", 99)


def _streams():
    out = []
    for dt in ("bfloat16", "float16", "float32"):
        a = np.concatenate([_gg_bits(dt, 400, 1.0, seed=3), _special(dt)])
        for model in ("hist", "gg"):
            out.append((dt, a.size, L.encode_tensor(a, dt, model=model)))
    return out


STREAMS = _streams()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(STREAMS) - 1), data=st.data())
def test_fuzzed_reader_raises_value_error(which, data):
    """Mutated or truncated streams raise LosslessError (a ValueError), never crash or return other bits."""
    dt, n, s = STREAMS[which]
    b = bytearray(s)
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "set"]))
    if op == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif op == "extend":
        b += bytes(data.draw(st.binary(min_size=1, max_size=8)))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255)) if op == "set" else b[i] ^ (1 << data.draw(st.integers(0, 7)))
    if bytes(b) == s:
        return
    try:
        out = L.decode_tensor(bytes(b), dt, n)
    except ValueError:
        return
    # a mutation that leaves the decoded bits unchanged (e.g. a GG parameter's last bit giving the
    # same integer table) is harmless; any other success would be a CRC-32 collision
    assert np.array_equal(out, L.decode_tensor(s, dt, n))


def test_header_fields_are_bounded():
    s = bytearray(L.encode_tensor(np.arange(50, dtype=np.uint16), "bf16"))
    s[4 + 4 + 0 : 4 + 4 + 8] = (1 << 62).to_bytes(8, "little")  # n in the header
    with pytest.raises(L.LosslessError):
        L.decode_tensor(bytes(s), "bf16", 1 << 62)


# ---------------------------------------------------------------- byte planes (fp32, fp16 with k <= 2)


def _low_repetitive(dt: str, n: int, seed: int = 0) -> np.ndarray:
    """Values cast up from a shorter format (fp32 from fp16, fp16 from bf16: low bytes mostly zero) and the specials,
    NaN payloads and subnormals with nonzero low bytes included."""
    t = ggprior.gg.sample((n,), beta=0.03, gamma=1.0, generator=torch.Generator().manual_seed(seed))
    t = t.half().float() if dt == "float32" else t.bfloat16().half()
    a = np.concatenate([L.as_bits(t, dt), _special(dt)])
    np.random.default_rng(seed).shuffle(a)
    return a


@pytest.mark.parametrize("dt", ["float16", "float32"])
def test_byte_planes_round_trip_where_chosen_and_not(dt):
    """Every k round-trips; the planes are taken on repetitive low bytes (where k leaves a whole byte below the
    coded bits) and make the stream smaller, never on random low bytes (the original layout, byte for byte)."""
    rep, rnd = _low_repetitive(dt, 20_000), np.concatenate([_gg_bits(dt, 20_000, 1.0), _special(dt)])
    chosen = set()
    for a, want in ((rep, True), (rnd, False)):
        for k in [None, *range(L.KMAX[dt] + 1)]:
            s = L.encode_tensor(a, dt, k=k)
            info = L.stream_info(s)
            assert np.array_equal(L.decode_tensor(s, dt, a.size), a)
            assert info["planes"] in (0, (L.DTYPES[dt][3] - info["k"]) // 8)
            if info["planes"]:
                chosen.add(k)
                assert want and len(s) < len(L.encode_tensor(a, dt, k=k, planes=False))
            else:
                assert s == L.encode_tensor(a, dt, k=k, planes=False)
    assert None in chosen and 0 in chosen  # the default k and k = 0 take the planes on the repetitive tensor
    assert L.stream_info(L.encode_tensor(rep, dt, model="hist"))["planes"] and \
        L.stream_info(L.encode_tensor(rep, dt, model="gg"))["planes"]


def test_byte_planes_sizes_on_values_cast_up():
    """fp32 holding fp16 values: the 13 zero mantissa bits cost almost nothing (about 16 bits/value, not 29)."""
    a = _low_repetitive("float32", 50_000)
    assert 8 * len(L.encode_tensor(a, "float32")) / a.size < 17.0 < 8 * len(L.encode_tensor(a, "fp32", planes=False)) / a.size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dt=st.sampled_from(["float16", "float32"]), data=st.data())
def test_planes_never_make_a_stream_larger(dt, data):
    """On any mix of repetitive and random low bytes the chosen stream is at most the original layout's size."""
    n = data.draw(st.integers(1, 3000))
    lowbits = data.draw(st.integers(0, 16 if dt == "float32" else 8))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a = _low_repetitive(dt, n, seed)
    a = a ^ rng.integers(0, 1 << lowbits, a.size).astype(a.dtype)
    k = data.draw(st.one_of(st.none(), st.integers(0, L.KMAX[dt])))
    s, old = L.encode_tensor(a, dt, k=k), L.encode_tensor(a, dt, k=k, planes=False)
    assert len(s) <= len(old) and (L.stream_info(s)["planes"] > 0 or s == old)
    assert np.array_equal(L.decode_tensor(s, dt, a.size), a)


def _plane_streams() -> list[tuple[str, int, bytes, int, int]]:
    """(dtype, n, stream, start, end) of GG-model streams with byte planes; [start, end) is the plane section."""
    out = []
    for dt in ("float16", "float32"):
        a = _low_repetitive(dt, 600, seed=5)
        for k in (0, 2):
            s = L.encode_tensor(a, dt, model="gg", k=k)
            info = L.stream_info(s)
            assert info["planes"] and info["model"] == "gg"
            start = L.HEAD.size + L.GG_MODEL.size
            start += L.LEN.size + L.LEN.unpack(s[start : start + L.LEN.size])[0]
            end = len(s) - ((a.size * (1 + L.DTYPES[dt][3] - k - 8 * info["planes"]) + 7) >> 3)
            out.append((dt, a.size, s, start, end))
    return out


PLANE_STREAMS = _plane_streams()
STREAMS.extend((dt, n, s) for dt, n, s, _, _ in PLANE_STREAMS)  # the generic fuzzed reader above covers them too


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(PLANE_STREAMS) - 1), data=st.data())
def test_fuzzed_plane_sections_raise_value_error(which, data):
    """Bytes of the plane section (methods, lengths, zstd frames) set, flipped, cut out or inserted: LosslessError
    or the original bits, never a crash or other bits."""
    dt, n, s, start, end = PLANE_STREAMS[which]
    b = bytearray(s)
    op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
    i = data.draw(st.integers(start, end - 1))
    if op == "cut":
        del b[i : data.draw(st.integers(i + 1, end))]
    elif op == "insert":
        b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    elif op == "truncate":
        del b[i:]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            j = data.draw(st.integers(start, end - 1))
            b[j] = data.draw(st.integers(0, 255)) if op == "set" else b[j] ^ (1 << data.draw(st.integers(0, 7)))
    try:
        out = L.decode_tensor(bytes(b), dt, n)
    except ValueError as e:
        assert str(e).startswith("lossless: ") and "\n" not in str(e)
        return
    assert np.array_equal(out, L.decode_tensor(s, dt, n))


@pytest.mark.parametrize(("sections", "match"), [
    (lambda n, p: [L.PLANE.pack(2, n) + p[0].tobytes(), L.PLANE.pack(0, n) + p[1].tobytes()], "unknown byte plane"),
    (lambda n, p: [L.PLANE.pack(0, n - 1) + p[0].tobytes()[1:], L.PLANE.pack(0, n) + p[1].tobytes()], "raw byte"),
    (lambda n, p: [L.PLANE.pack(0, n) + p[0].tobytes(), L.PLANE.pack(0, 1 << 40)], "byte plane 1 of"),
    (lambda n, p: [L.PLANE.pack(0, n) + p[0].tobytes()], "sections do not add up|byte plane 1"),
    (lambda n, p: [_zframe(p[0], size=False), L.PLANE.pack(0, n) + p[1].tobytes()], "declares"),
    (lambda n, p: [_zframe(p[0][:-1]), L.PLANE.pack(0, n) + p[1].tobytes()], "declares"),
    (lambda n, p: [_zframe(p[0], tail=b"x"), L.PLANE.pack(0, n) + p[1].tobytes()], "exactly"),
    (lambda n, p: [L.PLANE.pack(1, 5) + b"\x00" * 5, L.PLANE.pack(0, n) + p[1].tobytes()], "bad zstd frame"),
])
def test_malformed_plane_sections_are_named(sections, match):
    """Plane sections of an fp32 stream (k 0) rewritten: each problem named in a one-line LosslessError."""
    dt, n, s, start, end = PLANE_STREAMS[2]
    bad = s[:start] + b"".join(sections(n, L.byte_planes(L.decode_tensor(s, dt, n), 2))) + s[end:]
    with pytest.raises(L.LosslessError, match=match):
        L.decode_tensor(bad, dt, n)


def _zframe(plane: np.ndarray, size: bool = True, tail: bytes = b"") -> bytes:
    z = zstandard.ZstdCompressor(level=1, write_content_size=size).compress(plane.tobytes()) + tail
    return L.PLANE.pack(1, len(z)) + z


def test_planes_flag_is_checked_against_dtype_and_k():
    """bf16 has no byte plane, nor fp16 with k > 2: the flag there is an error, not a silent layout."""
    for dt, k in (("bfloat16", 0), ("float16", 3)):
        s = bytearray(L.encode_tensor(_gg_bits(dt, 100, 1.0), dt, k=k))
        s[5] |= L.PLANES_FLAG
        with pytest.raises(L.LosslessError, match="byte planes flagged"):
            L.decode_tensor(bytes(s), dt, 100)
