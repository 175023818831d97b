"""Coders: round trips, exact code lengths against the bitstreams, known values, damaged input."""

import heapq
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggprior import gg
from ggprior.codec import ans, expgolomb, fixed, ggmodel, huffman, registry
from ggprior.codec.bits import CodingError, zigzag
from ggprior.codec.ggmodel import GGParams
from ggprior.codec.histogram import Histogram, histogram

ints = hnp.arrays(np.int32, st.integers(0, 400), elements=st.integers(-3000, 3000))
peaked = st.builds(
    lambda seed, n, scale: np.round(np.random.default_rng(seed).laplace(0, scale, n)).astype(np.int32),
    st.integers(0, 2**32 - 1), st.integers(1, 2000), st.floats(0.01, 300.0),
)
GG = GGParams(0.0, 3.0, 1.0)


def _bits_str(data: bytes) -> str:
    return "".join(f"{b:08b}" for b in data)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("coder", registry.CODERS)
@given(q=st.one_of(ints, peaked))
def test_every_coder_round_trips(coder, q):
    gg = ggmodel.fit(histogram(q)).as_float32() if q.size else GG
    data, params = registry.encode(coder, q, gg)
    out = registry.decode(coder, data, q.size, params, gg)
    assert out.dtype == np.int64
    assert np.array_equal(out, q)


@given(q=ints, k=st.integers(0, 12), signed=st.booleans())
def test_expgolomb_round_trip_any_order(q, k, signed):
    if not signed:
        q = np.abs(q)
    data = expgolomb.encode(q, k, signed=signed)
    assert np.array_equal(expgolomb.decode(data, q.size, k, signed=signed), q)


def test_coders_accept_torch_and_extreme_values():
    q = torch.tensor([-(2**30) + 1, 0, 2**30 - 1], dtype=torch.int32)
    for coder in ("fl", "eg"):
        data, params = registry.encode(coder, q.numpy())
        assert registry.decode(coder, data, 3, params).tolist() == q.tolist()
    assert np.array_equal(expgolomb.decode(expgolomb.encode(q, 0), 3, 0), q.numpy())


# --- code lengths equal bitstream lengths --------------------------------------------------

@given(q=st.one_of(ints, peaked), k=st.integers(0, 10))
def test_expgolomb_lengths_equal_stream(q, k):
    h = histogram(q)
    bits = expgolomb.total_bits_hist(h.symbols, h.counts, k)
    assert bits == int(expgolomb.lengths(zigzag(q), k).sum())
    assert len(expgolomb.encode(q, k)) == math.ceil(bits / 8)


@given(q=st.one_of(ints, peaked))
def test_huffman_lengths_equal_stream(q):
    h = histogram(q)
    data, params = huffman.encode(q)
    table = math.ceil(huffman.LEN_BITS * params["nsym"] / 8)
    bits = huffman.total_bits_hist(h)  # natural lengths never exceed MAX_LEN at these sizes
    assert len(data) == table + math.ceil(bits / 8)


@given(q=st.one_of(ints, peaked))
def test_fixed_length_stream(q):
    data, params = fixed.encode(q)
    if q.size:
        assert params["width"] == max(1, int(q.max()) - int(q.min())).bit_length()
        assert params["qmin"] == int(q.min())
    assert len(data) == math.ceil(q.size * params["width"] / 8)


@given(q=peaked)
def test_ans_stream_matches_ideal_length(q):
    h = histogram(q)
    gg = ggmodel.fit(h).as_float32()
    data, p = ans.encode_gg(q, gg)
    ideal = ans.ideal_bits(h, ans.gg_probs(p["qmin"], p["nsym"], gg), p["qmin"])
    # rANS: ideal + at most the 64-bit final state + 32 bits of word rounding + quantization of p
    assert ideal - 1 <= 8 * len(data) <= ideal * 1.002 + ans.OVERHEAD_BITS + 32
    data, p = ans.encode_hist(q)
    ideal = ans.ideal_bits(h, h.dense().astype(float) if p["nsym"] == h.dense().size else
                           np.r_[h.dense(), 0].astype(float), p["qmin"])
    payload = 8 * (len(data) - p["table_bytes"])
    assert ideal - 1 <= payload <= ideal * 1.002 + ans.OVERHEAD_BITS + 32


# --- known values --------------------------------------------------------------------------

def test_expgolomb_known_codewords():
    # order 0, unsigned: 0 -> 1, 1 -> 010, 2 -> 011, 3 -> 00100
    assert _bits_str(expgolomb.encode(np.array([0, 1, 2, 3]), 0, signed=False)) == "1010011001000000"
    # order 2, unsigned: 0 -> 100, 5 -> 01001 (5 + 4 = 9 = 1001)
    assert _bits_str(expgolomb.encode(np.array([0, 5]), 2, signed=False)) == "10001001"
    # signed order 0: -1 -> zigzag 1 -> 010
    assert _bits_str(expgolomb.encode(np.array([-1]), 0)) == "01000000"
    assert expgolomb.lengths(np.arange(8), 0).tolist() == [1, 3, 3, 5, 5, 5, 5, 7]
    assert expgolomb.lengths(np.arange(6), 1).tolist() == [2, 2, 4, 4, 4, 4]


def test_expgolomb_best_order_is_the_argmin():
    rng = np.random.default_rng(0)
    for scale, expect_large in ((0.3, False), (200.0, True)):
        q = np.round(rng.laplace(0, scale, 20000)).astype(np.int64)
        h = histogram(q)
        k, bits = expgolomb.best_order(h.symbols, h.counts)
        actual = [8 * len(expgolomb.encode(q, kk)) for kk in range(16)]
        assert bits == expgolomb.total_bits_hist(h.symbols, h.counts, k)
        assert math.ceil(bits / 8) * 8 == min(actual)
        assert (k >= 5) == expect_large
    assert expgolomb.best_order(np.array([0]), np.array([10]))[0] == 0


def test_huffman_known_lengths():
    assert huffman.code_lengths(np.array([1, 1, 2, 4])).tolist() == [3, 3, 2, 1]
    assert huffman.code_lengths(np.array([5, 5, 5, 5])).tolist() == [2, 2, 2, 2]
    assert huffman.code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    assert huffman.code_lengths(np.array([3, 0, 1])).tolist() == [1, 0, 1]
    fib = np.array([1, 1, 2, 3, 5, 8, 13])
    assert huffman.code_lengths(fib).tolist() == [6, 6, 5, 4, 3, 2, 1]
    assert huffman.canonical_codes(np.array([3, 3, 2, 1])).tolist() == [0b110, 0b111, 0b10, 0b0]


def _reference_huffman_bits(counts: list[int]) -> int:
    heap = [c for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=300).filter(any))
def test_huffman_total_equals_reference_and_kraft(counts):
    c = np.array(counts)
    lens = huffman.code_lengths(c)
    assert int(np.dot(lens, c)) == _reference_huffman_bits(counts)
    if np.count_nonzero(c) > 1:  # a full binary tree: Kraft sum is exactly 1
        assert sum(2.0 ** -int(v) for v in lens[lens > 0]) == 1.0
    assert huffman.kraft_ok(lens)


def test_huffman_limited_lengths_fit():
    fib = [1, 1]
    while len(fib) < 33:
        fib.append(fib[-1] + fib[-2])
    assert int(huffman.code_lengths(np.array(fib)).max()) == 32
    lens = huffman.limited_lengths(np.array(fib))
    assert int(lens.max()) <= huffman.MAX_LEN and huffman.kraft_ok(lens)
    q = np.repeat(np.arange(33, dtype=np.int32), fib)  # 9.2 M values whose natural code needs 32 bits
    data, p = huffman.encode(q)
    assert np.array_equal(huffman.decode(data, q.size, **p), q)


def test_fixed_known_stream():
    data, p = fixed.encode(np.array([-1, 0, 2]))
    assert p == {"qmin": -1, "width": 2}
    assert _bits_str(data) == "00011100"
    assert fixed.decode(data, 3, -1, 2).tolist() == [-1, 0, 2]


# --- entropy, GG model ---------------------------------------------------------------------

def test_histogram_matches_unique():
    rng = np.random.default_rng(1)
    for q in (rng.integers(-50, 50, 1000), np.array([-(2**40), 0, 2**40, 0])):
        h = histogram(q)
        s, c = np.unique(q, return_counts=True)
        assert np.array_equal(h.symbols, s) and np.array_equal(h.counts, c)
    h = Histogram(np.array([0, 1]), np.array([2, 2]))
    assert h.entropy_bits() == 4.0
    assert histogram(np.zeros(0, np.int32)).entropy_bits() == 0.0


def test_gg_bin_probabilities_match_the_cdf():
    p = GGParams(0.3, 2.5, 0.8)
    pr = ggmodel.bin_probs(-60, 60, p)
    x = torch.arange(-60, 61, dtype=torch.float64)
    ref = gg.cdf(x + 0.5, 0.3, 2.5, 0.8) - gg.cdf(x - 0.5, 0.3, 2.5, 0.8)
    np.testing.assert_allclose(pr, ref.numpy(), rtol=1e-9, atol=1e-15)
    # far tail: no cancellation, still positive and decreasing
    far = ggmodel.bin_probs(400, 402, p)
    assert (far > 0).all() and far[0] > far[1] > far[2]


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_gg_ideal_close_to_entropy_on_gg_data(gamma):
    x = gg.sample((200_000,), 0.0, 6.0, gamma, generator=torch.Generator().manual_seed(3))
    h = histogram(torch.round(x).to(torch.int64))
    ent = h.entropy_bits()
    for method in ("moment", "ml"):
        fit = ggmodel.fit(h, method)
        ideal = ggmodel.ideal_bits(h, fit)
        assert ent <= ideal <= ent * 1.005  # cross-entropy >= entropy; the model fits GG data
        assert fit.gamma == pytest.approx(gamma, rel=0.1)
        assert fit.beta == pytest.approx(6.0, rel=0.1)
    # the ML fit minimises the ideal length itself
    assert ggmodel.ideal_bits(h, ggmodel.fit(h, "ml")) <= ggmodel.ideal_bits(h, ggmodel.fit(h, "moment")) + 1e-6
    # and the rANS model pays almost nothing for its capping and quantization
    params = ggmodel.fit(h).as_float32()
    data, p = ans.encode_gg(h.symbols.repeat(h.counts), params)
    assert 8 * len(data) <= ggmodel.ideal_bits(h, params) * 1.001 + 128


def test_capped_probabilities():
    p = ans.capped(np.array([1.0, 0.0, 0.0]))
    assert p[0] == ans.P_MAX and (p[1:] > 0).all() and p.sum() == pytest.approx(1.0)
    assert np.array_equal(ans.capped(np.array([1.0, 3.0])), np.array([0.25, 0.75]))


# --- damaged input -------------------------------------------------------------------------

@pytest.mark.parametrize("coder", registry.CODERS)
@given(q=peaked, data=st.data())
def test_damaged_streams_raise_coding_error(coder, q, data):
    gg = ggmodel.fit(histogram(q)).as_float32()
    stream, params = registry.encode(coder, q, gg)
    b = bytearray(stream)
    if data.draw(st.booleans(), "truncate") or not b:
        b = b[: data.draw(st.integers(0, max(0, len(b) - 1)), "cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), "flips")):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        out = registry.decode(coder, bytes(b), q.size, params, gg)
    except CodingError:
        return
    assert out.shape == (q.size,)  # undetected by the coder (the container's checksums catch it)


@pytest.mark.parametrize("coder", registry.CODERS)
@given(blob=st.binary(max_size=64), n=st.integers(0, 10**12))
def test_garbage_streams_never_crash_or_overallocate(coder, blob, n):
    params = {"fl": {"qmin": 0, "width": 7}, "eg": {"k": 2}, "huffman": {"qmin": -3, "nsym": 7},
              "ans": {"qmin": -3, "nsym": 7}, "ans-hist": {"qmin": -3, "nsym": 7, "k": 1,
                                                            "table_bytes": max(1, min(3, len(blob)))}}[coder]
    try:
        out = registry.decode(coder, blob, n, params, GG)
    except CodingError:
        return
    assert out.shape == (n,) and n <= ans.max_symbols(len(blob))  # the loosest bound of any coder


def test_bad_parameters_are_named():
    with pytest.raises(CodingError, match="unknown coder 'zip'"):
        registry.check_coder("zip")
    assert registry.check_coder("ANS_hist") == "ans-hist"
    with pytest.raises(CodingError, match="expects parameters"):
        registry.decode("eg", b"\x80", 1, {"k": 0, "x": 1})
    with pytest.raises(CodingError, match="must be an integer"):
        registry.decode("eg", b"\x80", 1, {"k": True})
    with pytest.raises(CodingError, match="order k"):
        expgolomb.encode(np.array([1]), 40)
    with pytest.raises(CodingError, match="non-negative"):
        expgolomb.encode(np.array([-1]), 0, signed=False)
    with pytest.raises(CodingError, match="needs GG parameters"):
        registry.encode("ans", np.array([1, 2]))
    with pytest.raises(CodingError, match="integer array"):
        registry.encode("huffman", np.array([0.5]))
    with pytest.raises(CodingError, match="trailing"):
        expgolomb.decode(b"\x80\x00", 1, 0)
    with pytest.raises(CodingError, match="beta and gamma"):
        ans.decode_gg(b"\x00" * 8, 1, GGParams(0.0, -1.0, 1.0), 0, 4)


@pytest.mark.parametrize("coder", ["ans", "ans-hist", "eg", "huffman"])
def test_claimed_count_is_bounded_by_the_stream(coder):
    q = np.zeros(100_000, dtype=np.int32)
    q[::1000] = 1  # a very peaked tensor: the cheapest symbols any real stream holds
    gg = ggmodel.fit(histogram(q)).as_float32()
    data, params = registry.encode(coder, q, gg)
    assert np.array_equal(registry.decode(coder, data, q.size, params, gg), q)
    with pytest.raises(CodingError, match="cannot (fit|be coded)|counts sum"):
        registry.decode(coder, data, 1000 * q.size, params, gg)
