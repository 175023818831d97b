"""DeepShape speed in seconds per 100M parameters, against baselines measured in the same run.

Times :func:`ggprior.deepshape.reshape_values` (sort-based, vectorised) on synthetic GG weights
(gamma 1.2, beta 0.05, float32) and compares it with, on the same values:

- ``sort``: one ``torch.sort`` of the tensor (a floor for any rank-preserving remap),
- ``loop``: the reference code's structure (sort, then hand the sorted values out level by
  level in a Python loop, floor counts), the same target and cut.

With ``--minilm`` it also times the whole all-MiniLM-L6-v2 model (39 matrices, per tensor).

    python benchmarks/bench_deepshape.py [--numel 10000000] [--repeats 3] [--threads 1] [--minilm]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ggprior import gg
from ggprior.deepshape import BIN_WIDTH, deepshape, reshape_values

PER = 1e8


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def loop_remap(x: torch.Tensor, k_gamma: float, k_beta: float, w: float = BIN_WIDTH) -> torch.Tensor:
    """The reference structure: sorted core values handed out per level in a Python loop (floor counts)."""
    sv, order = torch.sort(x.reshape(-1))
    lev = torch.round(sv / w).to(torch.int64)
    fit = gg.fit(sv)
    a, b = int(lev[0]), int(lev[-1])
    edges = (torch.arange(a, b + 2, dtype=torch.float64) - 0.5) * w
    probs = torch.diff(gg.cdf(edges, fit.mu, k_beta * fit.beta, k_gamma * fit.gamma))
    counts = torch.floor(probs / probs.sum() * sv.numel()).to(torch.int64).tolist()
    out = sv.clone()
    pos = 0
    for i, c in enumerate(counts):
        if c:
            out[pos : pos + c] = (a + i) * w
            pos += c
    res = torch.empty_like(out)
    res[order] = out
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm", action="store_true", help="also time the whole MiniLM model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = gg.sample((args.numel,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(0))
    times = {
        "deepshape": best_seconds(lambda: reshape_values(x, 1.1, 0.7), args.repeats),
        "sort": best_seconds(lambda: torch.sort(x), args.repeats),
        "loop": best_seconds(lambda: loop_remap(x, 1.1, 0.7), args.repeats),
    }
    per100m = {k: v * PER / args.numel for k, v in times.items()}
    out = {
        "benchmark": "deepshape_seconds_per_100M", "numel": args.numel, "dtype": "float32", "repeats": args.repeats,
        "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
        "seconds": times, "seconds_per_100M": per100m,
        "ratio_deepshape_vs_sort": times["deepshape"] / times["sort"],
        "speedup_vs_loop": times["loop"] / times["deepshape"],
    }
    if args.minilm:
        from ggprior.io.sources import open_source

        src = open_source("minilm")
        state = {k: src[k] for k in src}
        res = deepshape(state, 1.1, 0.7)
        n = sum(r.numel for r in res.reports)
        t = best_seconds(lambda: deepshape(state, 1.1, 0.7), args.repeats)
        out["minilm"] = {"values": n, "tensors": len(res.reports), "seconds": t, "seconds_per_100M": t * PER / n}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
