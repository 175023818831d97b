"""v4 statistics: are weights, activations and gradients all generalized-Gaussian?

MiniLM (all-MiniLM-L6-v2 with a fresh 2-class head) on sentiment batches: the weights
(``ggprior.stats.fit_model``), every layer's activations (``ggprior.hooks.activation_statistics``,
padding excluded) and every parameter's per-batch gradient of the fine-tuning loss
(``ggprior.hooks.gradient_statistics``). Each row: moment fit, maximum-likelihood refit on a
sample, mean log-likelihood of GG / Gaussian / Laplacian and KS distances.

    python experiments/v4_stats.py [--quick] [--out docs/results/v4_stats]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ggprior import gg
from ggprior.io.atomic import write_text
from ggprior.io.tables import write_table
from ggprior.report.plots import plot_fit
from ggprior.stats import LINEAR_ROW, fit_model, hooks
from ggprior.tasks import batches, get_tokenizer, load_task
from ggprior.tasks.models import load_minilm

SIZES = {"quick": dict(examples=16, batch=8, max_samples=1 << 12), "full": dict(examples=128, batch=16,
                                                                                  max_samples=1 << 15)}
COLUMNS = ["kind", "name", "numel", "mu", "beta", "gamma", "mu_mle", "beta_mle", "gamma_mle", "loglik_gg", "loglik_gg_mle",
           "loglik_gauss", "loglik_laplace", "ks_gg", "ks_gauss", "ks_laplace", "best_law"]
POOLS = {"weights": LINEAR_ROW, "activations": "__activations__", "gradients": "__gradients__"}


def _fit(row: dict) -> gg.GGFit:
    if "gamma_mle" in row:
        return gg.GGFit(mu=row["mu_mle"], beta=row["beta_mle"], gamma=row["gamma_mle"], n=row["numel"], std=row["std"],
                         ratio=float("nan"), at_bound=False, method="mle")
    return gg.GGFit(mu=row["mu"], beta=row["beta"], gamma=row["gamma"], n=row["numel"], std=row["std"],
                     ratio=float("nan"), at_bound=row["gamma_at_bound"], method="moment")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/results/v4_stats"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = SIZES["quick" if args.quick else "full"]
    t0 = time.perf_counter()
    tok = get_tokenizer("minilm")
    data = load_task("sentiment", "train", tok, 64, max_examples=s["examples"], split_seed=0)
    torch.manual_seed(args.seed)
    model = load_minilm(2)

    def feed():
        return batches(data, s["batch"])

    samples: dict[str, dict[str, torch.Tensor]] = {k: {} for k in POOLS}
    weight_rows = fit_model(model, mle=False, max_gof_values=s["max_samples"], seed=args.seed, progress=False,
                            pool_samples=samples["weights"])
    for r in weight_rows:
        r["kind"] = "weights"
        if "loglik_gg" in r:
            r["best_law"] = hooks.best_law(r)
        if r["name"] == LINEAR_ROW and "gamma" in r:
            values = samples["weights"][LINEAR_ROW]
            ref = gg.refine_mle(values, replace(_fit(r), n=values.numel()))
            r.update(mu_mle=ref.mu, gamma_mle=ref.gamma, beta_mle=ref.beta,
                     loglik_gg_mle=gg.mean_loglik(values, ref.mu, ref.beta, ref.gamma))
            r["best_law"] = hooks.best_law(r)
    act_rows = hooks.activation_statistics(model, feed, max_samples=s["max_samples"], seed=args.seed, mle=True,
                                           progress=True, samples=samples["activations"])
    grad_rows = hooks.gradient_statistics(model, feed, max_samples=s["max_samples"], seed=args.seed, mle=True,
                                          progress=True, samples=samples["gradients"])
    rows = weight_rows + act_rows + grad_rows
    pooled = [r for r in rows if r["name"].startswith(("__", "group:")) and "gamma" in r]
    write_table(rows, args.out, "all", COLUMNS, title="GG fits of MiniLM weights, activations and gradients")
    write_table(pooled, args.out, "pooled", COLUMNS, title="Pooled rows (kind and group pools)")
    pngs = []
    for kind, key in POOLS.items():
        row = next(r for r in rows if r["name"] == key)
        values = samples[kind][key]
        pngs.append(str(plot_fit(values, _fit(row), args.out / f"{kind}.png",
                                 title=f"MiniLM {kind} ({key}, sample of {values.numel():,})")))
    per_tensor = [r for r in rows if not r["name"].startswith(("__", "group:")) and "best_law" in r]
    wins = {}
    for kind in POOLS:
        rs = [r for r in per_tensor if r["kind"] == kind]
        wins[kind] = {law: sum(r["best_law"] == law for r in rs) for law in ("gg", "gauss", "laplace")}
    meta = {"command": f"python experiments/v4_stats.py{' --quick' if args.quick else ''} --out {args.out} "
                       f"--seed {args.seed}", "examples": s["examples"], "batch": s["batch"],
            "max_samples": s["max_samples"], "best_law_counts": wins, "plots": pngs,
            "seconds": time.perf_counter() - t0}
    write_text(args.out / "meta.json", json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
