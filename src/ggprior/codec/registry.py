"""One interface over every coder: ``encode(name, q, gg) -> (stream, params)``, ``decode(...)``.

``params`` is a small JSON-able dict of side information (integers only) that the container
stores in its header; large tables (Huffman lengths, histogram counts) are inside the stream.
Coder names: ``fl``, ``eg``, ``huffman``, ``ans`` (rANS under the fitted GG model),
``ans-hist`` (rANS under the histogram). This is the one list of coder names: the code lengths
of :func:`ggprior.codec.lengths.measure` add ``eg-fixed`` (Exp-Golomb at one fixed order) and two
ideal figures without a stream (``entropy``, ``gg``). Names are spelled with a hyphen; the
columns of result rows use the same name with ``_`` (``bits_ans_hist``, :func:`column`).
"""

from __future__ import annotations

import numpy as np

from . import ans, expgolomb, fixed, ggmodel, huffman, rans
from .bits import CodingError
from .ggmodel import GGParams
from .histogram import Histogram, histogram

CODERS = ("fl", "eg", "huffman", "ans", "ans-hist")
"""Every coder that writes a stream (the ``coder`` of a ``.ggz`` tensor)."""
MEASURES = ("fl", "eg", "eg-fixed", "huffman", "entropy", "gg", "ans", "ans-hist")
"""What :func:`ggprior.codec.lengths.measure` computes: the coders, ``eg-fixed`` and the ideal figures."""
IDEAL = ("entropy", "gg")

_PARAM_KEYS = {
    "fl": ("qmin", "width"),
    "eg": ("k",),
    "huffman": ("qmin", "nsym"),
    "ans": ("qmin", "nsym"),
    "ans-hist": ("qmin", "nsym", "k", "table_bytes"),
}


def check_coder(name: str, known: tuple[str, ...] = CODERS) -> str:
    """Normalise a coder name (``ans_hist`` -> ``ans-hist``) and check it is one of ``known``."""
    n = str(name).lower().replace("_", "-")
    if n not in known:
        raise CodingError(f"unknown coder {name!r}; choose one of {', '.join(known)}")
    return n


def column(name: str) -> str:
    """The form of a coder name in result keys: ``ans-hist`` -> ``ans_hist`` (``bits_ans_hist``)."""
    return name.replace("-", "_")


def encode(name: str, q: np.ndarray, gg: GGParams | None = None) -> tuple[bytes, dict]:
    """Code the integers ``q`` with coder ``name``; ``gg`` (step units) is required for ``ans``."""
    name = check_coder(name)
    q = np.ascontiguousarray(np.asarray(q).reshape(-1))
    if name == "fl":
        return fixed.encode(q)
    if name == "eg":
        h = histogram(q)
        k, _ = expgolomb.best_order(h.symbols, h.counts) if h.n else (0, 0)
        return expgolomb.encode(q, k), {"k": k}
    if name == "huffman":
        return huffman.encode(q)
    if name == "ans":
        if gg is None:
            raise CodingError("coder 'ans' needs GG parameters")
        return ans.encode_gg(q, gg)
    return ans.encode_hist(q)


def decode(name: str, data: bytes | memoryview, n: int, params: dict, gg: GGParams | None = None) -> np.ndarray:
    """Decode ``n`` integers (int64); raises :class:`CodingError` on bad parameters or data."""
    name = check_coder(name)
    keys = _PARAM_KEYS[name]
    if not isinstance(params, dict) or set(params) != set(keys):
        raise CodingError(f"coder {name!r} expects parameters {sorted(keys)}, got {params!r}")
    for k in keys:
        if not isinstance(params[k], int) or isinstance(params[k], bool):
            raise CodingError(f"coder {name!r}: parameter {k!r} must be an integer, got {params[k]!r}")
    if name == "fl":
        return fixed.decode(data, n, params["qmin"], params["width"])
    if name == "eg":
        return expgolomb.decode(data, n, params["k"])
    if name == "huffman":
        return huffman.decode(data, n, params["qmin"], params["nsym"])
    if name == "ans":
        if gg is None:
            raise CodingError("coder 'ans' needs GG parameters")
        return ans.decode_gg(data, n, gg, params["qmin"], params["nsym"])
    return ans.decode_hist(data, n, **params)


def rans_table(coder: str, hist: Histogram, gg: GGParams) -> tuple[int, np.ndarray]:
    """(qmin, frequency table) of a tensor for the ``ans`` coders of version 2.

    ``ans-hist``: the histogram; ``ans``: the GG bin probabilities of the symbols that occur. Either
    way the table is quantized integer-exactly (:func:`ggprior.codec.rans.quantize_freqs`) and
    stored in the file, so reading never recomputes a float model.
    """
    qmin, nsym = hist.qmin, max(2, hist.qmax - hist.qmin + 1)
    if nsym > rans.NSYM_MAX:
        raise CodingError(f"rANS: alphabet of {nsym} values exceeds {rans.NSYM_MAX}; use a larger step")
    dense = np.zeros(nsym, dtype=np.int64)
    dense[hist.symbols - qmin] = hist.counts
    if coder == "ans-hist":
        return qmin, rans.quantize_freqs(dense)
    p = ggmodel.range_probs(qmin, qmin + nsym - 1, gg)
    return qmin, rans.quantize_freqs(np.where(dense > 0, p, 0.0))


def best_rans_table(coder: str, hist: Histogram, gg: GGParams) -> tuple[str, int, np.ndarray]:
    """(coder, qmin, table) the writer stores for ``coder``: ``ans-hist`` its histogram; ``ans`` the GG table, or the
    histogram where that makes the table plus the code shorter (a law the GG does not fit: a spike of exact zeros
    from a sparsifying rate term, a dequantized model's few levels)."""
    qmin, f = rans_table(coder, hist, gg)
    if coder != "ans" or hist.n == 0:
        return coder, qmin, f
    _, fh = rans_table("ans-hist", hist, gg)

    def cost(t: np.ndarray) -> float:
        return 8.0 * len(rans.pack_freqs(t)) - float((hist.counts * np.log2(t[hist.symbols - qmin])).sum())

    return ("ans-hist", qmin, fh) if cost(fh) < cost(f) else ("ans", qmin, f)
