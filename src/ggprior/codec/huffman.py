"""Canonical Huffman code: exact code lengths from a histogram, and a numba encoder/decoder.

Lengths come from the in-place algorithm of Moffat & Katajainen (1995) on the sorted counts,
O(n) after the sort. The paper's HM figure is the exact (unrestricted) Huffman length;
the bitstream coder limits lengths to ``MAX_LEN`` bits (halving the counts until the
longest code fits, which only changes codes whose natural length exceeds it) so the decoder
can read each codeword from one 64-bit window.

Stream layout (MSB-first bits): the code length of every symbol ``qmin .. qmin + nsym - 1``
in ``LEN_BITS`` bits each (0 = symbol absent), padded to a byte, then the codewords.
Codes are canonical (DEFLATE order: by length, then by symbol), so the lengths define them.
A single-symbol alphabet gets a 1-bit code, so every codeword costs at least one bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .bits import PAD, CodingError, check_decoded, flush_bits, pack_fixed, padded, peek, put_bits, refill, unpack_fixed
from .histogram import Histogram, as_int_array, histogram

MAX_LEN = 30
LEN_BITS = 5
TABLE_BITS = 11
FAST_BITS = 12  # the fast decoder's table (4096 entries)
NSYM_MAX = 1 << 24


@njit(cache=True)
def _mk_lengths(a: np.ndarray) -> np.ndarray:
    """Huffman code lengths of ascending positive weights (Moffat-Katajainen, in place on a copy)."""
    A = a.copy()
    n = A.shape[0]
    leaf = 0
    root = 0
    for nxt in range(n - 1):
        if leaf >= n or (root < nxt and A[root] < A[leaf]):
            A[nxt] = A[root]
            A[root] = nxt
            root += 1
        else:
            A[nxt] = A[leaf]
            leaf += 1
        if leaf >= n or (root < nxt and A[root] < A[leaf]):
            A[nxt] += A[root]
            A[root] = nxt
            root += 1
        else:
            A[nxt] += A[leaf]
            leaf += 1
    A[n - 2] = 0
    for nxt in range(n - 3, -1, -1):
        A[nxt] = A[A[nxt]] + 1
    avbl = 1
    used = 0
    depth = 0
    root = n - 2
    nxt = n - 1
    while avbl > 0:
        while root >= 0 and A[root] == depth:
            used += 1
            root -= 1
        while avbl > used:
            A[nxt] = depth
            nxt -= 1
            avbl -= 1
        avbl = 2 * used
        depth += 1
        used = 0
    return A


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Exact Huffman code lengths (int64) for ``counts``; symbols with count 0 get length 0.

    A single present symbol gets length 1 (a code needs at least one bit per symbol).
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.size and int(c.min()) < 0:
        raise CodingError("Huffman: counts must be non-negative")
    out = np.zeros(c.size, dtype=np.int64)
    present = np.flatnonzero(c)
    if present.size == 1:
        out[present] = 1
    elif present.size > 1:
        order = present[np.argsort(c[present], kind="stable")]
        out[order] = _mk_lengths(c[order])
    return out


def limited_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman lengths no longer than ``max_len``: counts are halved (kept >= 1) until they fit."""
    c = np.asarray(counts, dtype=np.int64)
    if np.count_nonzero(c) > 1 << max_len:
        raise CodingError(f"Huffman: {np.count_nonzero(c)} symbols cannot have codes of at most {max_len} bits")
    lens = code_lengths(c)
    while lens.size and int(lens.max()) > max_len:
        c = np.where(c > 0, (c + 1) >> 1, 0)
        lens = code_lengths(c)
    return lens


def total_bits_hist(hist: Histogram) -> int:
    """Exact Huffman-coded size in bits of a histogram (payload only, no table)."""
    return int(np.dot(code_lengths(hist.counts), hist.counts))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords (uint64) for code lengths (0 = unused), DEFLATE order."""
    lens = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lens.size, dtype=np.uint64)
    used = np.flatnonzero(lens)
    if used.size == 0:
        return codes
    order = used[np.lexsort((used, lens[used]))]
    ol = lens[order]
    code = 0
    prev = int(ol[0])
    out = np.empty(order.size, dtype=np.int64)
    # Run-length over lengths: within one length codes are consecutive integers.
    starts = np.flatnonzero(np.r_[True, ol[1:] != ol[:-1]])
    ends = np.r_[starts[1:], ol.size]
    for s, e in zip(starts, ends, strict=True):
        L = int(ol[s])
        code <<= L - prev
        out[s:e] = code + np.arange(e - s)
        code += e - s
        prev = L
    codes[order] = out.astype(np.uint64)
    return codes


def kraft_ok(lengths: np.ndarray) -> bool:
    """Whether code lengths satisfy Kraft's inequality sum 2^-l <= 1 (exactly, in integers)."""
    lens = np.asarray(lengths, dtype=np.int64)
    used = lens[lens > 0]
    if used.size == 0:
        return False
    return int(np.sum(np.left_shift(np.int64(1), MAX_LEN - used))) <= 1 << MAX_LEN


@njit(cache=True)
def _encode(x: np.ndarray, qmin: int, codes: np.ndarray, lens: np.ndarray, total: int) -> np.ndarray:
    nbytes = (total + 7) >> 3
    out = np.zeros(nbytes + PAD, dtype=np.uint8)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(x.shape[0]):
        s = np.int64(x[i]) - qmin
        p, acc, nacc = put_bits(out, p, acc, nacc, codes[s], lens[s])
    flush_bits(out, p, acc, nacc)
    return out[:nbytes]


@njit(cache=True)
def _decode(
    buf: np.ndarray, nbits: int, n: int, qmin: int, tab_sym: np.ndarray, tab_len: np.ndarray, tbits: int,
    first: np.ndarray, count: np.ndarray, offset: np.ndarray, sorted_sym: np.ndarray, max_len: int,
) -> tuple[np.ndarray, int, int]:
    """Decode n values; returns (values, status, bit position). status 0 ok, 1 truncated, 2 bad code."""
    out = np.empty(n, dtype=np.int64)
    acc = np.uint64(0)
    nacc = 0
    p = 0
    pos = 0
    for i in range(n):
        if pos >= nbits:
            return out, 1, pos
        p, acc, nacc = refill(buf, p, acc, nacc)
        idx = peek(acc, nacc, tbits)
        L = np.int64(tab_len[idx])
        if L > 0:
            s = np.int64(tab_sym[idx])
        else:
            s = -1
            for l in range(tbits + 1, max_len + 1):
                d = np.int64(peek(acc, nacc, l)) - first[l]
                if d >= 0 and d < count[l]:
                    s = np.int64(sorted_sym[offset[l] + d])
                    L = l
                    break
            if s < 0:
                return out, 2, pos
        nacc -= L
        pos += L
        if pos > nbits:
            return out, 1, pos
        out[i] = s + qmin
    return out, 0, pos


@njit(cache=True, inline="always")
def _window(buf: np.ndarray, pos: int) -> np.uint64:
    """64 bits from byte ``pos >> 3`` (big-endian), shifted so bit ``pos`` is the MSB (>= 57 valid)."""
    b = pos >> 3
    w = ((np.uint64(buf[b]) << np.uint64(56)) | (np.uint64(buf[b + 1]) << np.uint64(48))
         | (np.uint64(buf[b + 2]) << np.uint64(40)) | (np.uint64(buf[b + 3]) << np.uint64(32))
         | (np.uint64(buf[b + 4]) << np.uint64(24)) | (np.uint64(buf[b + 5]) << np.uint64(16))
         | (np.uint64(buf[b + 6]) << np.uint64(8)) | np.uint64(buf[b + 7]))
    return w << np.uint64(pos & 7)


@njit(cache=True)
def _decode_fast(
    buf: np.ndarray, nbits: int, n: int, qmin: int, tab: np.ndarray, fbits: int,
    first: np.ndarray, count: np.ndarray, offset: np.ndarray, sorted_sym: np.ndarray, max_len: int,
    out: np.ndarray,
) -> tuple[np.ndarray, int, int]:
    """Table-driven decoder into ``out`` (int64, n values), same contract as :func:`_decode` (its oracle).

    ``out`` comes from NumPy, whose large allocations use transparent huge pages: first-touch
    page faults on a numba-allocated output cost more than the decoding itself.

    ``tab`` maps the next ``fbits`` bits to ``symbol index << 8 | length`` (length 0: a longer
    code, decoded canonically). One 64-bit window (>= 57 valid bits) serves up to
    ``57 // fbits`` codewords; the position is checked against the stream once per window
    (``buf`` holds ``PAD`` bytes past the end, and a window advances at most 57 bits).
    """
    pos = 0
    i = 0
    per = 57 // fbits
    sh = np.uint64(64 - fbits)
    while i < n:
        if pos > nbits:
            return out, 1, pos
        w = _window(buf, pos)
        m = min(per, n - i)
        for _ in range(m):
            e = tab[w >> sh]
            L = e & 0xFF
            if L == 0:
                break
            w <<= np.uint64(L)
            pos += L
            out[i] = (e >> 8) + qmin
            i += 1
        else:
            continue
        # a code longer than fbits bits: canonical search from a fresh window
        w = _window(buf, pos)
        s = -1
        for l in range(fbits + 1, max_len + 1):
            d = np.int64(w >> np.uint64(64 - l)) - first[l]
            if d >= 0 and d < count[l]:
                s = np.int64(sorted_sym[offset[l] + d])
                pos += l
                break
        if s < 0:
            return out, 2, pos
        out[i] = s + qmin
        i += 1
    if pos > nbits:
        return out, 1, pos
    return out, 0, pos


def _fast_table(lens: np.ndarray, fbits: int) -> np.ndarray:
    """The fast decoder's table: ``symbol index << 8 | length`` for codes of at most ``fbits`` bits."""
    codes = canonical_codes(lens)
    tab = np.zeros(1 << fbits, dtype=np.int64)
    short = np.flatnonzero((lens > 0) & (lens <= fbits))
    if short.size:
        span = np.left_shift(1, fbits - lens[short])
        starts = codes[short].astype(np.int64) << (fbits - lens[short])
        idx = np.repeat(starts, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
        tab[idx] = (np.repeat(short, span) << 8) | np.repeat(lens[short], span)
    return tab


def _tables(lens: np.ndarray) -> tuple:
    """Decoding tables: a direct table for codes up to ``tbits`` bits, canonical ranges beyond."""
    codes = canonical_codes(lens)
    max_len = int(lens.max())
    tbits = min(TABLE_BITS, max_len)
    tab_sym = np.zeros(1 << tbits, dtype=np.int32)
    tab_len = np.zeros(1 << tbits, dtype=np.uint8)
    short = np.flatnonzero((lens > 0) & (lens <= tbits))
    if short.size:
        span = np.left_shift(1, tbits - lens[short])
        starts = codes[short].astype(np.int64) << (tbits - lens[short])
        idx = np.repeat(starts, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
        tab_sym[idx] = np.repeat(short, span)
        tab_len[idx] = np.repeat(lens[short], span)
    used = np.flatnonzero(lens)
    order = used[np.lexsort((used, lens[used]))]
    count = np.bincount(lens[used], minlength=MAX_LEN + 1).astype(np.int64)
    offset = np.r_[0, np.cumsum(count)[:-1]].astype(np.int64)
    first = np.zeros(MAX_LEN + 1, dtype=np.int64)
    present = count > 0
    first[present] = codes[order[offset[present]]].astype(np.int64)
    return tab_sym, tab_len, tbits, first, count, offset, order.astype(np.int64), max_len


def encode(q: np.ndarray) -> tuple[bytes, dict]:
    """Huffman-code an integer array; returns (stream, params) with params ``{"qmin", "nsym"}``."""
    a = as_int_array(q)
    h = histogram(a)
    if a.size == 0:
        h = Histogram(np.zeros(1, np.int64), np.ones(1, np.int64))
    nsym = h.qmax - h.qmin + 1
    if nsym > NSYM_MAX:
        raise CodingError(f"Huffman: alphabet of {nsym} values exceeds {NSYM_MAX}; use a larger step")
    dense = h.dense()
    lens = limited_lengths(dense)
    codes = canonical_codes(lens)
    total = int(np.dot(lens, dense)) if a.size else 0
    table = pack_fixed(lens.astype(np.uint64), LEN_BITS).tobytes()
    payload = _encode(np.ascontiguousarray(a), h.qmin, codes, lens.astype(np.int64), total).tobytes()
    return table + payload, {"qmin": h.qmin, "nsym": int(nsym)}


def decode(data: bytes | bytearray | memoryview, n: int, qmin: int, nsym: int) -> np.ndarray:
    """Decode ``n`` integers (int64) from a stream written by :func:`encode`.

    Validates the length table (range, Kraft's inequality) and bounds ``n`` by the payload
    size (every codeword takes at least the shortest code length) before allocating.
    """
    if not isinstance(nsym, (int, np.integer)) or not 1 <= int(nsym) <= NSYM_MAX:
        raise CodingError(f"Huffman: alphabet size must be in [1, {NSYM_MAX}], got {nsym!r}")
    if not isinstance(qmin, (int, np.integer)) or abs(int(qmin)) >= 1 << 40:
        raise CodingError(f"Huffman: qmin must be an integer of moderate size, got {qmin!r}")
    nsym, qmin = int(nsym), int(qmin)
    tbytes = (nsym * LEN_BITS + 7) >> 3
    if len(data) < tbytes:
        raise CodingError(f"Huffman: stream of {len(data)} bytes is shorter than its {tbytes}-byte length table")
    lens = unpack_fixed(padded(bytes(data[:tbytes])), nsym, LEN_BITS)
    if int(lens.max()) > MAX_LEN:
        raise CodingError(f"Huffman: code length {int(lens.max())} exceeds {MAX_LEN}")
    if not kraft_ok(lens):
        raise CodingError("Huffman: code length table is empty or violates Kraft's inequality")
    payload = data[tbytes:]
    nbits = 8 * len(payload)
    shortest = int(lens[lens > 0].min())
    if n < 0 or n * shortest > nbits:
        raise CodingError(f"Huffman: {n} values cannot fit in {len(payload)} payload bytes "
                          f"(at least {shortest} bits each)")
    tab_sym, tab_len, tbits, first, count, offset, order, max_len = _tables(lens)
    fbits = min(FAST_BITS, max_len)
    out, status, pos = _decode_fast(padded(payload), nbits, int(n), qmin, _fast_table(lens, fbits), fbits,
                                    first, count, offset, order, max_len, np.empty(int(n), dtype=np.int64))
    check_decoded("Huffman", status, pos, len(payload), n, where="payload ")
    return out
