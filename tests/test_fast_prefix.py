"""The fast Huffman and Exp-Golomb decoders against the reference decoders they replaced.

The reference kernels (``huffman._decode``, ``expgolomb._decode``) stay in their modules as the
oracle: the fast kernels must give the same values, status and bit position on every stream,
valid or not, and streams written before the change must still read (golden bytes below)."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggprior.codec import expgolomb, huffman
from ggprior.codec.bits import padded

ints = hnp.arrays(np.int64, st.integers(0, 3000), elements=st.integers(-5000, 5000))
peaked = st.builds(
    lambda seed, n, scale, gamma: np.round(
        np.random.default_rng(seed).gamma(1 / gamma, scale, n) ** (1 / gamma)
        * np.random.default_rng(seed + 1).choice([-1, 1], n)).clip(-2**22, 2**22).astype(np.int64),
    st.integers(0, 2**31), st.integers(0, 5000), st.floats(0.01, 1e4), st.floats(0.2, 2.5),
)
wide = st.builds(lambda seed, n: np.random.default_rng(seed).integers(-2**31 + 1, 2**31 - 1, n),
                 st.integers(0, 2**31), st.integers(0, 300))

# Streams written by the encoders before the fast decoders existed (the encoders are unchanged).
GOLDEN = json.loads((Path(__file__).parent / "golden" / "prefix_v1.json").read_text())


@pytest.mark.parametrize("case", ["small", "gg"])
def test_golden_streams_still_read(case):
    g = GOLDEN[case]
    values = np.array(g["values"], dtype=np.int64)
    huff, eg = bytes.fromhex(g["huffman"]), bytes.fromhex(g["eg"])
    assert huffman.decode(huff, values.size, **g["huffman_params"]).tolist() == g["values"]
    assert expgolomb.decode(eg, values.size, g["eg_k"]).tolist() == g["values"]
    assert huffman.encode(values) == (huff, g["huffman_params"])
    assert expgolomb.encode(values, g["eg_k"]) == eg


def _huffman_both(data: bytes, n: int, qmin: int, nsym: int):
    """(reference result, fast result) on the payload of a Huffman stream with a valid table."""
    tbytes = (nsym * huffman.LEN_BITS + 7) >> 3
    lens = huffman.unpack_fixed(padded(data[:tbytes]), nsym, huffman.LEN_BITS)
    payload = data[tbytes:]
    tables = huffman._tables(lens)
    ref = huffman._decode(padded(payload), 8 * len(payload), n, qmin, *tables)
    fbits = min(huffman.FAST_BITS, tables[-1])
    tab_sym, tab_len, tbits, first, count, offset, order, max_len = tables
    fast = huffman._decode_fast(padded(payload), 8 * len(payload), n, qmin, huffman._fast_table(lens, fbits),
                                fbits, first, count, offset, order, max_len, np.empty(n, dtype=np.int64))
    return ref, fast


def _same(ref, fast):
    (o1, s1, p1), (o2, s2, p2) = ref, fast
    assert s1 == s2
    if s1 == 0:
        assert p1 == p2
        np.testing.assert_array_equal(o1, o2)


@given(q=st.one_of(ints, peaked))
def test_huffman_fast_equals_reference(q):
    data, params = huffman.encode(q)
    ref, fast = _huffman_both(data, q.size, params["qmin"], params["nsym"])
    assert ref[1] == 0
    _same(ref, fast)
    np.testing.assert_array_equal(fast[0], q)


@given(q=st.one_of(ints, peaked), data=st.data())
def test_huffman_fast_equals_reference_on_damaged_payloads(q, data):
    stream, params = huffman.encode(q)
    tbytes = (params["nsym"] * huffman.LEN_BITS + 7) >> 3
    payload = bytearray(stream[tbytes:])
    how = data.draw(st.sampled_from(["flip", "cut", "garbage", "extra"]))
    if how == "flip" and payload:
        pos = data.draw(st.integers(0, 8 * len(payload) - 1))
        payload[pos >> 3] ^= 1 << (pos & 7)
    elif how == "cut":
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    elif how == "garbage":
        payload = bytearray(data.draw(st.binary(max_size=300)))
    n = q.size + (1 if how == "extra" else 0)
    ref, fast = _huffman_both(bytes(stream[:tbytes] + payload), n, params["qmin"], params["nsym"])
    _same(ref, fast)


def test_huffman_long_codes():
    """Codes longer than the fast table (up to MAX_LEN bits) take the canonical path."""
    q = np.repeat(np.arange(22), [1] + [2**k for k in range(21)])  # lengths 1 .. 21
    np.random.default_rng(0).shuffle(q)
    stream, params = huffman.encode(q)
    assert int(huffman.code_lengths(np.bincount(q)).max()) == 21
    ref, fast = _huffman_both(stream, q.size, params["qmin"], params["nsym"])
    _same(ref, fast)
    np.testing.assert_array_equal(huffman.decode(stream, q.size, **params), q)


def _eg_both(data: bytes, n: int, k: int, signed: bool):
    buf = padded(data)
    fast = expgolomb._decode_fast(buf, 8 * len(data), n, k, signed, np.empty(n, dtype=np.int64))
    return expgolomb._decode(buf, 8 * len(data), n, k, signed), fast


@given(q=st.one_of(ints, peaked, wide), k=st.integers(0, 31), signed=st.booleans())
def test_expgolomb_fast_equals_reference(q, k, signed):
    if not signed:
        q = np.abs(q)
    top = (int(np.abs(q).max()) * 2 + 1 if q.size else 0)
    if top + (1 << k) >= 1 << 32:
        return
    data = expgolomb.encode(q, k, signed=signed)
    ref, fast = _eg_both(data, q.size, k, signed)
    assert ref[1] == 0
    _same(ref, fast)
    np.testing.assert_array_equal(fast[0], q)


@given(blob=st.binary(max_size=400), n=st.integers(0, 800), k=st.integers(0, 31), signed=st.booleans())
def test_expgolomb_fast_equals_reference_on_garbage(blob, n, k, signed):
    _same(*_eg_both(blob, n, k, signed))


@given(q=st.one_of(ints, peaked), k=st.integers(0, 12), data=st.data())
def test_expgolomb_fast_equals_reference_on_damaged(q, k, data):
    stream = bytearray(expgolomb.encode(q, k))
    if stream:
        pos = data.draw(st.integers(0, 8 * len(stream) - 1))
        stream[pos >> 3] ^= 1 << (pos & 7)
        stream = stream[: data.draw(st.integers(0, len(stream)))]
    _same(*_eg_both(bytes(stream), q.size + data.draw(st.integers(0, 2)), k, True))
