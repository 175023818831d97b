"""Fit throughput against scipy.stats.gennorm.fit, and the whole-model fit time of MiniLM.

    python benchmarks/bench_fit.py [--n 1000000] [--scipy-n 200000]

Prints JSON: MB/s of float32 for our moment fit (and with MLE refinement) and for SciPy's
generic MLE on the same values, the speed ratio, every gamma estimate, and MiniLM's time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from scipy import stats

from ggprior import gg
from ggprior.stats import fit_model


def _timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--scipy-n", type=int, default=200_000)
    p.add_argument("--gamma", type=float, default=1.2)
    args = p.parse_args()
    torch.set_num_threads(1)
    x = gg.sample((args.n,), 0.0, 0.05, args.gamma, generator=torch.Generator().manual_seed(0))
    small = x[: args.scipy_n]
    mb, mb_small = x.numel() * 4 / 1e6, small.numel() * 4 / 1e6
    t_ours, f_ours = _timed(lambda: gg.fit(x))
    t_ours_s, f_ours_s = _timed(lambda: gg.fit(small))
    t_mle, f_mle = _timed(lambda: gg.fit(x, mle=True), repeat=1)
    t_scipy, (g_scipy, _, b_scipy) = _timed(lambda: stats.gennorm.fit(small.double().numpy()), repeat=1)
    t0 = time.perf_counter()
    rows = fit_model("minilm", progress=False)
    t_minilm = time.perf_counter() - t0
    model = next(r for r in rows if r["name"] == "__model__")
    print(json.dumps({
        "true_gamma": args.gamma, "n": args.n, "scipy_n": args.scipy_n, "threads": 1,
        "moment_fit": {"MB_per_s": mb / t_ours, "gamma": f_ours.gamma, "beta": f_ours.beta},
        "moment_fit_on_scipy_n": {"MB_per_s": mb_small / t_ours_s, "gamma": f_ours_s.gamma},
        "mle_refined": {"MB_per_s": mb / t_mle, "gamma": f_mle.gamma, "beta": f_mle.beta},
        "scipy_gennorm_fit": {"MB_per_s": mb_small / t_scipy, "gamma": g_scipy, "beta": b_scipy},
        "speedup_moment_vs_scipy_same_data": t_scipy / t_ours_s,
        "minilm_whole_model_fit_s": t_minilm, "minilm_numel": model["numel"],
        "minilm_MB_per_s": model["numel"] * 4 / 1e6 / t_minilm,
    }, indent=1))


if __name__ == "__main__":
    main()
