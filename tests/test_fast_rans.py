"""The table-driven rANS coder (ggprior.codec.rans): round trips, size against the entropy,
the frequency quantizer, the table serialization, and damaged input."""

import math

import constriction
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ggprior.codec import rans
from ggprior.codec.bits import CodingError


def _gg_ints(n: int, gamma: float, seed: int = 0, levels: int = 1023) -> np.ndarray:
    """GG-distributed values quantized on a 10-bit grid, shifted to start at 0."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(1 / gamma, size=n) ** (1 / gamma) * rng.choice([-1, 1], size=n)
    q = np.rint(x / (2 * np.abs(x).max() / levels)).astype(np.int64)
    return q - q.min()


def _entropy_bits(q: np.ndarray) -> float:
    c = np.bincount(q)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


@st.composite
def tables_and_messages(draw):
    nsym = draw(st.integers(2, 300))
    kind = draw(st.sampled_from(["uniform", "skewed", "sparse", "one"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "uniform":
        counts = np.ones(nsym, dtype=np.int64)
    elif kind == "skewed":
        counts = np.floor(1e6 * np.exp(-rng.uniform(0, 30) * np.arange(nsym) / nsym)).astype(np.int64)
    elif kind == "sparse":
        counts = rng.integers(0, 3, nsym) * rng.integers(1, 1000, nsym)
        counts[rng.integers(nsym)] += 1
    else:
        counts = np.zeros(nsym, dtype=np.int64)
        counts[rng.integers(nsym)] = 1000
    pb = draw(st.integers(max(rans.MIN_PROB_BITS, math.ceil(math.log2(max(2, nsym)))), rans.MAX_PROB_BITS))
    freqs = rans.quantize_freqs(counts, pb)
    n = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 1001, 20000]))
    present = np.flatnonzero(freqs)
    p = freqs[present] / freqs[present].sum()
    msg = rng.choice(present, size=n, p=p).astype(np.int64)
    return freqs, msg


@given(tables_and_messages())
def test_round_trip(case):
    freqs, msg = case
    data = rans.encode(msg, freqs)
    out = rans.decode(data, freqs, msg.size)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, msg)
    assert msg.size <= rans.max_symbols(len(data), freqs)  # the bomb bound never rejects a real stream


@given(tables_and_messages(), st.data())
def test_damaged_streams_raise(case, data):
    freqs, msg = case
    stream = rans.encode(msg, freqs)
    if not stream:
        with pytest.raises(CodingError):
            rans.decode(b"\0" * 4, freqs, 0)
        return
    how = data.draw(st.sampled_from(["truncate", "flip", "extend", "n+1", "n-1"]))
    if how == "truncate":
        cut = data.draw(st.integers(0, len(stream) - 1))
        with pytest.raises(CodingError):
            rans.decode(stream[:cut], freqs, msg.size)
    elif how == "extend":
        with pytest.raises(CodingError):
            rans.decode(stream + b"\1\2", freqs, msg.size)
    elif how == "n+1":
        with pytest.raises(CodingError):
            rans.decode(stream, freqs, msg.size + 1)
    elif how == "n-1":
        with pytest.raises(CodingError):
            rans.decode(stream, freqs, msg.size - 1)
    else:
        # a flipped bit either raises or decodes to something: never a crash, never a hang
        pos = data.draw(st.integers(0, 8 * len(stream) - 1))
        bad = bytearray(stream)
        bad[pos >> 3] ^= 1 << (pos & 7)
        try:
            out = rans.decode(bytes(bad), freqs, msg.size)
        except CodingError:
            return
        assert out.shape == msg.shape and int(out.min()) >= 0 and int(out.max()) < freqs.size


def test_single_flips_mostly_detected():
    msg = _gg_ints(5000, 1.0, seed=1)
    freqs = rans.quantize_freqs(np.bincount(msg))
    stream = rans.encode(msg, freqs)
    caught = 0
    for pos in range(0, 8 * len(stream), 7):
        bad = bytearray(stream)
        bad[pos >> 3] ^= 1 << (pos & 7)
        try:
            rans.decode(bytes(bad), freqs, msg.size)
        except CodingError:
            caught += 1
    assert caught >= 0.99 * len(range(0, 8 * len(stream), 7))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_size_within_0_3_percent_of_entropy(gamma):
    q = _gg_ints(1_000_000, gamma, seed=3)
    freqs = rans.quantize_freqs(np.bincount(q))
    data = rans.encode(q, freqs)
    assert 8 * len(data) <= 1.003 * _entropy_bits(q)
    assert 8 * len(data) >= _entropy_bits(q)  # no coder beats the empirical entropy (sanity)


def test_size_matches_constriction_reference():
    """Against the project's previous coder (constriction's AnsCoder, 24-bit probabilities)."""
    q = _gg_ints(200_000, 0.8, seed=4)
    counts = np.bincount(q)
    freqs = rans.quantize_freqs(counts)
    ours = len(rans.encode(q, freqs))
    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder.encode_reverse(q.astype(np.int32), model)
    ref = 4 * coder.get_compressed().size
    assert ours <= 1.003 * ref


def test_cost_close_to_table_information():
    """The stream length equals the message's information under the quantized table, to a few bytes."""
    q = _gg_ints(300_000, 1.3, seed=5)
    freqs = rans.quantize_freqs(np.bincount(q), 12)
    info = float(-np.log2(freqs[q] / 4096.0).sum())
    assert abs(8 * len(rans.encode(q, freqs)) - info) <= 8 * rans.HEADER_BYTES + 64


@given(st.lists(st.integers(0, 10**9), min_size=2, max_size=500), st.integers(8, 16))
def test_quantize_freqs_properties(counts, pb):
    c = np.array(counts, dtype=np.int64)
    nz = np.count_nonzero(c)
    if nz == 0 or nz > 1 << pb:
        with pytest.raises(CodingError):
            rans.quantize_freqs(c, pb)
        return
    f = rans.quantize_freqs(c, pb)
    assert f.dtype == np.uint32 and f.size == c.size
    assert int(f.sum()) == 1 << pb
    assert np.all(f[c > 0] >= 1)
    assert int(f.max()) < 1 << pb
    if nz > 1:
        assert np.all(f[c == 0] == 0)
    else:
        assert np.count_nonzero(f) == 2
    np.testing.assert_array_equal(f, rans.quantize_freqs(c.copy(), pb))  # deterministic
    # scaling the counts (exactly) does not change the table; probabilities give the same table
    np.testing.assert_array_equal(f, rans.quantize_freqs(3 * c, pb))


def test_quantize_freqs_near_optimal():
    """Within 0.05% of the cross-entropy of the exact greedy (log-cost) optimum."""
    import heapq

    q = _gg_ints(300_000, 0.7, seed=6)
    c = np.bincount(q)
    m = 1 << 13
    f = rans.quantize_freqs(c, 13).astype(np.int64)
    g = (c > 0).astype(np.int64)
    h = [(-c[i], i) for i in np.flatnonzero(c)]
    heapq.heapify(h)
    for _ in range(m - int(g.sum())):
        _, i = heapq.heappop(h)
        g[i] += 1
        heapq.heappush(h, (-(c[i] * math.log2((g[i] + 1) / g[i])), i))
    nz = c > 0
    ours = -(c[nz] * np.log2(f[nz] / m)).sum()
    best = -(c[nz] * np.log2(g[nz] / m)).sum()
    assert best <= ours <= 1.0005 * best


def test_quantize_freqs_probabilities():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    f = rans.quantize_freqs(p, 10)
    np.testing.assert_array_equal(f, [512, 256, 128, 128, 0])
    np.testing.assert_array_equal(rans.quantize_freqs(p.astype(np.float32), 10), f)
    np.testing.assert_array_equal(rans.quantize_freqs(np.array([1e-300, 1.0]), 8), [1, 255])


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([-1, 2]), np.array([0, 0]), np.array([5]),
                                 np.array([1.0, -0.5]), np.array(["a", "b"])])
def test_quantize_freqs_rejects(bad):
    with pytest.raises(CodingError):
        rans.quantize_freqs(bad)


def test_quantize_freqs_rejects_prob_bits():
    for pb in (7, 17, 12.0, "14"):
        with pytest.raises(CodingError):
            rans.quantize_freqs(np.array([1, 2]), pb)


@given(tables_and_messages())
def test_pack_unpack(case):
    freqs, _ = case
    pb = int(freqs.sum()).bit_length() - 1
    packed = rans.pack_freqs(freqs)
    f2, used = rans.unpack_freqs(packed + b"trailing", freqs.size, pb)
    assert used == len(packed)
    assert f2.dtype == np.uint32
    np.testing.assert_array_equal(f2, freqs)


def test_pack_is_compact():
    freqs = rans.quantize_freqs(np.bincount(_gg_ints(1_000_000, 1.0)))
    assert len(rans.pack_freqs(freqs)) < 0.5 * freqs.size  # under 4 bits per entry on a smooth GG table


@given(st.binary(max_size=64), st.integers(2, 50), st.integers(8, 16))
def test_unpack_garbage_raises_or_is_valid(data, nsym, pb):
    try:
        f, used = rans.unpack_freqs(data, nsym, pb)
    except CodingError:
        return
    assert int(f.sum()) == 1 << pb and 1 <= used <= len(data) and f.size == nsym


@given(st.binary(max_size=200), st.integers(0, 3000))
def test_decode_garbage_never_crashes(data, n):
    freqs = rans.quantize_freqs(np.array([100, 50, 25, 12, 6, 3, 1, 1]), 12)
    try:
        out = rans.decode(data, freqs, n)
    except CodingError:
        return
    assert out.size == n


def test_bomb_bound():
    """A tiny stream cannot claim a huge n: rejected before anything is allocated."""
    freqs = rans.quantize_freqs(np.array([10**9, 1]), 15)
    assert int(freqs[0]) == (1 << 15) - 1
    bits_min = -math.log2(int(freqs[0]) / (1 << 15))
    for n in (1000, 200_000, 3_000_000):
        msg = np.zeros(n, dtype=np.int64)
        data = rans.encode(msg, freqs)  # the most probable symbol only: the cheapest possible stream
        bound = rans.max_symbols(len(data), freqs)
        assert n <= bound <= 2 * (8 * len(data) - 64) / bits_min + 4
        with pytest.raises(CodingError, match="cannot be coded"):
            rans.decode(data, freqs, bound + 1)
    # once the message outweighs the final states, the bound is within the margin of the real count
    freqs8 = rans.quantize_freqs(np.array([10**9, 1]), 8)
    n = 3_000_000
    data = rans.encode(np.zeros(n, dtype=np.int64), freqs8)
    assert n <= rans.max_symbols(len(data), freqs8) <= 2.05 * n
    with pytest.raises(CodingError, match="cannot be coded"):
        rans.decode(b"\0" * 16, freqs, 10**12)
    uniform = rans.quantize_freqs(np.ones(256), 8)
    data = rans.encode(np.arange(256).repeat(10), uniform)
    assert rans.max_symbols(len(data), uniform) <= 2.02 * 2560 + 4


def test_bad_tables():
    msg = np.array([0, 1, 1])
    for bad in ([1, 2, 3], [256, 0], [0, 255.5], [[128, 128]], [128], [-1, 257]):
        with pytest.raises(CodingError):
            rans.encode(msg, np.array(bad))
        with pytest.raises(CodingError):
            rans.decode(b"\0" * 18, np.array(bad), 1)


def test_bad_symbols():
    freqs = np.array([128, 128, 0], dtype=np.uint32)
    for bad in ([0, 3], [0, -1], [2], np.array([0.0, 1.0])):
        with pytest.raises(CodingError):
            rans.encode(np.array(bad), freqs)
    with pytest.raises(CodingError):
        rans.encode(np.array([2**63], dtype=np.uint64), freqs)
    for n in (-1, 1.0, True):
        with pytest.raises(CodingError):
            rans.decode(b"", freqs, n)


def test_symbol_dtypes_and_memoryview():
    freqs = rans.quantize_freqs(np.arange(1, 9))
    msg = np.arange(8).repeat(50)
    ref = rans.encode(msg, freqs)
    for dt in (np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.uint64):
        assert rans.encode(msg.astype(dt), freqs) == ref
    np.testing.assert_array_equal(rans.decode(memoryview(bytearray(ref)), freqs, msg.size), msg)


def test_large_sparse_alphabet():
    """More than 2^16 symbols (the decoder's slot table switches to int32)."""
    rng = np.random.default_rng(9)
    counts = np.zeros(100_000, dtype=np.int64)
    present = rng.choice(100_000, 3000, replace=False)
    counts[present] = rng.integers(1, 100, 3000)
    freqs = rans.quantize_freqs(counts)
    msg = rng.choice(present, 50_000)
    np.testing.assert_array_equal(rans.decode(rans.encode(msg, freqs), freqs, msg.size), msg)
