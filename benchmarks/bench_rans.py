"""Entropy-coder throughput on 10-bit GG-quantized integers: the fast rANS against constriction.

    python benchmarks/bench_rans.py [--n 10000000] [--repeat 3] [--quick] [--out FILE.json]

For each shape gamma in (0.5, 1, 2), ``--n`` GG samples are quantized on the paper's 10-bit
grid (step = 2 max|x| / 1023). Coded with:

* ``rans``: :mod:`ggprior.codec.rans` (4 interleaved 32-bit states, table-driven decode),
  table from :func:`~ggprior.codec.rans.quantize_freqs` of the histogram;
* ``constriction`` (the baseline, the path of ``ggprior.codec.ans`` today): ``AnsCoder``
  with a ``Categorical`` model of the same histogram (model construction included, as in
  ``ans._encode``);
* ``huffman`` and ``eg``: ``ggprior.codec.huffman`` / ``expgolomb`` (numba), the stream the
  ``.ggz`` file holds (the Huffman length table included in its size).

Every stream is decoded and compared with the input. Times are the best of ``--repeat``
runs on one thread, as wall time and as the thread's CPU time (the machine may be shared:
CPU time is what one core delivers); ``load_avg_1min`` is the machine's load when the run
started. Sizes are reported against the empirical (zeroth-order) entropy. The ratios against
the baseline are in ``ratios``; ``goals`` checks the issue's targets. Prints JSON (and writes
it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import constriction
import numpy as np

from bench_codec import _timed  # benchmarks/ is on sys.path when run as a script
from ggprior.codec import expgolomb, huffman, rans


def gg_ints(n: int, gamma: float, seed: int) -> np.ndarray:
    """GG(0, 1, gamma) samples on a 10-bit grid (int64, centred at 0)."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(1 / gamma, size=n) ** (1 / gamma) * rng.choice(np.array([-1.0, 1.0]), size=n)
    return np.rint(x / (2 * np.abs(x).max() / 1023)).astype(np.int64)


def bench_one(q: np.ndarray, repeat: int) -> dict:
    n = q.size
    sym = (q - q.min()).astype(np.int32)
    counts = np.bincount(sym)
    c = counts[counts > 0].astype(np.float64)
    entropy = float(-(c * np.log2(c / n)).sum())
    out: dict = {"n": n, "alphabet": int(counts.size), "entropy_bits_per_symbol": entropy / n}

    def record(name, enc, dec, check):
        w_e, c_e, stream = _timed(enc, repeat)
        w_d, c_d, back = _timed(lambda: dec(stream), repeat)
        assert check(back), name
        size = len(stream) if isinstance(stream, (bytes, bytearray)) else stream[1]
        out[name] = {
            "encode_M_per_s_cpu": n / c_e / 1e6, "decode_M_per_s_cpu": n / c_d / 1e6,
            "encode_M_per_s_wall": n / w_e / 1e6, "decode_M_per_s_wall": n / w_d / 1e6,
            "bytes": size, "bits_per_symbol": 8 * size / n, "over_entropy": 8 * size / entropy - 1,
        }

    freqs = rans.quantize_freqs(counts)
    table = rans.pack_freqs(freqs)
    record("rans", lambda: rans.encode(sym, freqs), lambda s: rans.decode(s, freqs, n),
           lambda b: np.array_equal(b, sym))
    out["rans"]["table_bytes"] = len(table)
    out["rans"]["over_entropy_with_table"] = (out["rans"]["bytes"] + len(table)) * 8 / entropy - 1
    out["rans"]["prob_bits"] = rans.PROB_BITS

    probs = counts / counts.sum()

    def c_enc():
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, constriction.stream.model.Categorical(probs, perfect=False))
        w = coder.get_compressed()
        return w, 4 * w.size

    def c_dec(s):
        coder = constriction.stream.stack.AnsCoder(s[0])
        return coder.decode(constriction.stream.model.Categorical(probs, perfect=False), n)

    record("constriction", c_enc, c_dec, lambda b: np.array_equal(b, sym))

    record("huffman", lambda: huffman.encode(q)[0],
           lambda s: huffman.decode(s, n, int(q.min()), int(counts.size)), lambda b: np.array_equal(b, q))
    vals, cnts = np.unique(q, return_counts=True)
    k, _ = expgolomb.best_order(vals, cnts)
    out["eg_k"] = k
    record("eg", lambda: expgolomb.encode(q, k), lambda s: expgolomb.decode(s, n, k), lambda b: np.array_equal(b, q))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="100k symbols, one repeat (smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    n, repeat = (100_000, 1) if args.quick else (args.n, args.repeat)
    load = os.getloadavg()[0]
    # JIT warm-up (compiled kernels are cached on disk; this excludes any compile time)
    bench_one(gg_ints(5000, 1.0, 0), 1)
    cases = {f"gamma_{g}": bench_one(gg_ints(n, g, seed=i), repeat) for i, g in enumerate((0.5, 1.0, 2.0))}
    ratios, worst = {}, {}
    for key in ("encode_M_per_s_cpu", "decode_M_per_s_cpu"):
        for coder in ("rans", "huffman", "eg"):
            worst[f"{coder}_{key}"] = min(c[coder][key] for c in cases.values())
        ratios[f"rans_over_constriction_{key}"] = min(c["rans"][key] / c["constriction"][key] for c in cases.values())
    worst["rans_over_entropy"] = max(c["rans"]["over_entropy"] for c in cases.values())
    worst["rans_over_entropy_with_table"] = max(c["rans"]["over_entropy_with_table"] for c in cases.values())
    goals = {
        "rans_decode_ge_60M_per_s_cpu": worst["rans_decode_M_per_s_cpu"] >= 60,
        "rans_encode_ge_100M_per_s_cpu": worst["rans_encode_M_per_s_cpu"] >= 100,
        "rans_over_entropy_le_0.3pct": worst["rans_over_entropy"] <= 0.003,
        "huffman_decode_ge_150M_per_s_cpu": worst["huffman_decode_M_per_s_cpu"] >= 150,
        "eg_decode_ge_150M_per_s_cpu": worst["eg_decode_M_per_s_cpu"] >= 150,
    }
    result = {
        "benchmark": "bench_rans", "n_per_case": n, "repeat": repeat, "threads": 1, "quick": args.quick,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_avg_1min": load,
        "worst_case": worst, "ratios": ratios, "goals": goals, "cases": cases,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
