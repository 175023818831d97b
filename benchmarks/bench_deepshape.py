"""DeepShape speed in seconds per 100M parameters, against baselines measured in the same run.

Times :func:`ggprior.deepshape.reshape.reshape_values_reference` (sort-based, vectorised: ``deepshape``) on synthetic GG weights
(gamma 1.2, beta 0.05, float32) and compares it with, on the same values:

- ``sort``: one ``torch.sort`` of the tensor (a floor for any rank-preserving remap),
- ``loop``: the reference code's structure (sort, then hand the sorted values out level by
  level in a Python loop, floor counts), the same target and cut.

With ``--minilm`` it also times the whole all-MiniLM-L6-v2 model (39 matrices, per tensor).

``fast`` and ``fast_one_pass_fit``: :func:`ggprior.deepshape.remap.reshape_values_fast` (bucket
sort + fused remap; ``exact=False`` also fits the core in one pass), checked against the
reference's output (``identical``: bit for bit; ``values_moved``: how many differ). Every time
is the best of ``--repeats`` as wall and process CPU time (``cpu_seconds*``: the machine may be
shared), extrapolated linearly to 100M values; ``load_avg_1min`` is the load when it started.

    python benchmarks/bench_deepshape.py [--numel 10000000] [--repeats 3] [--threads 1] [--minilm] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ggprior import gg
from ggprior.deepshape import BIN_WIDTH, deepshape, reshape_values_reference
from ggprior.deepshape.remap import reshape_values_fast

PER = 1e8


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_cpu(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds)."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - t0)
    return wall, cpu


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
    ap.add_argument("--skip-loop", action="store_true", help="skip the slow reference-loop baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    x = gg.sample((args.numel,), 0.0, 0.05, 1.2, generator=torch.Generator().manual_seed(0))
    reshape_values_fast(x[:20000], 1.1, 0.7)  # JIT (cached on disk)
    reshape_values_fast(x[:20000], 1.1, 0.7, exact=False)
    fns = {
        "deepshape": lambda: reshape_values_reference(x, 1.1, 0.7),
        "fast": lambda: reshape_values_fast(x, 1.1, 0.7),
        "fast_one_pass_fit": lambda: reshape_values_fast(x, 1.1, 0.7, exact=False),
        "sort": lambda: torch.sort(x),
        "sort_stable": lambda: torch.sort(x, stable=True),
    }
    if not args.skip_loop:
        fns["loop"] = lambda: loop_remap(x, 1.1, 0.7)
    measured = {k: best_cpu(f, args.repeats) for k, f in fns.items()}
    times = {k: w for k, (w, _) in measured.items()}
    cpu = {k: c for k, (_, c) in measured.items()}
    per100m = {k: v * PER / args.numel for k, v in times.items()}
    ref = reshape_values_reference(x, 1.1, 0.7)[0]
    moved = {k: int((reshape_values_fast(x, 1.1, 0.7, exact=(k == "fast"))[0] != ref).sum())
             for k in ("fast", "fast_one_pass_fit")}
    out = {
        "benchmark": "deepshape_seconds_per_100M", "numel": args.numel, "dtype": "float32", "repeats": args.repeats,
        "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
        "seconds": times, "seconds_per_100M": per100m,
        "load_avg_1min": load, "cpus": os.cpu_count(),
        "cpu_seconds": cpu, "cpu_seconds_per_100M": {k: v * PER / args.numel for k, v in cpu.items()},
        "ratio_deepshape_vs_sort": times["deepshape"] / times["sort"],
        "speedup_vs_loop": times["loop"] / times["deepshape"] if "loop" in times else None,
        "fast": {
            "identical": moved["fast"] == 0, "values_moved": moved["fast"],
            "one_pass_fit_values_moved": moved["fast_one_pass_fit"],
            "speedup_vs_deepshape_cpu": cpu["deepshape"] / cpu["fast"],
            "speedup_one_pass_fit_vs_deepshape_cpu": cpu["deepshape"] / cpu["fast_one_pass_fit"],
            "fast_over_stable_sort_cpu": cpu["fast"] / cpu["sort_stable"],
            "goal_le_5s_per_100M_cpu": cpu["fast"] * PER / args.numel <= 5.0,
            "goal_le_5s_per_100M_cpu_one_pass_fit": cpu["fast_one_pass_fit"] * PER / args.numel <= 5.0,
        },
    }
    if args.minilm:
        from ggprior.io.sources import open_source

        src = open_source("minilm")
        state = {k: src[k] for k in src}
        res = deepshape(state, 1.1, 0.7)
        n = sum(r.numel for r in res.reports)
        t = best_seconds(lambda: deepshape(state, 1.1, 0.7), args.repeats)
        out["minilm"] = {"values": n, "tensors": len(res.reports), "seconds": t, "seconds_per_100M": t * PER / n}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
