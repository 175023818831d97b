"""Table 2: GG initialization shape x {conventional, BackSlash} for a BERT-style model on sentiment.

A small BERT (scale 1) is initialised with ``ggprior.init.gg_init_`` at gamma in {0.1, 0.5, 1, 2}
(gamma = 2 is He init in distribution: same variance 2 / fan-in) and trained conventionally or
with BackSlash (adaptive nu, eps 1, lambda fixed below, applied in all but the last epoch).
Reported per cell, mean +- std over seeds: test accuracy (float and quantized), CR(EG) and
CR(HM) against the fixed-length code, and the model size under FL and EG, all at the fixed
quantization step of ``ggprior.train.run`` (2^-8 on matrices; norms/biases exact, 32-bit).

    python experiments/table2_init.py [--quick] [--out DIR] [--jobs N] [--seeds S]
"""

from __future__ import annotations

import time

from _common import aggregate, markdown_table, meta, pm, run_grid, study_args, write_outputs
from ggprior.io.atomic import write_text
from ggprior.report.plots import plot_curves
from ggprior.train import TrainConfig
from ggprior.train.run import QUANT_STEP, RunConfig

GAMMAS = (0.1, 0.5, 1.0, 2.0)
SIZES = {
    "quick": dict(gammas=(0.1, 2.0), max_train=96, max_eval=64, epochs=2, max_len=32, lam=1000.0),
    "full": dict(gammas=GAMMAS, max_train=2000, max_eval=800, epochs=3, max_len=64, lam=1000.0),
}
METRICS = ["test", "test_quantized", "cr_eg", "cr_huffman", "kb_fl", "kb_eg", "bpw_eg", "bpw_huffman", "nu_mean",
           "seconds"]


def grid(size: dict, seeds: list[int]) -> list[tuple[dict, RunConfig]]:
    out = []
    for gamma in size["gammas"]:
        for training in ("conventional", "backslash"):
            for seed in seeds:
                bs = training == "backslash"
                cfg = RunConfig(task="sentiment", model="bert", init="gg", gamma=gamma,
                                rate="backslash" if bs else "none", lam=size["lam"] if bs else 0.0,
                                rate_epochs=size["epochs"] - 1 if bs else None, max_train=size["max_train"],
                                max_eval=size["max_eval"], max_len=size["max_len"],
                                train=TrainConfig(epochs=size["epochs"], lr=2e-3, seed=seed))
                out.append(({"training": training}, cfg))
    return out


def main() -> None:
    args = study_args(__doc__, "table2_init")
    size = SIZES["quick" if args.quick else "full"]
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    started = time.time()
    rows = run_grid(grid(size, seeds), args.jobs)
    agg = aggregate(rows, ["gamma", "training"], METRICS)
    m = meta(seeds, started, size=size, quant_step=QUANT_STEP, model="bert scale 1", task="sentiment")
    write_outputs(args.out, "table2", rows, agg, m)
    render(args.out, agg, len(seeds))
    print(f"wall {m['wall_seconds']} s; command: {m['command']}")


def render(out, agg: list[dict], n_seeds: int) -> None:
    """Plots and the Markdown table from the aggregated rows."""
    header = ["init gamma", "training", "test acc", "quantized acc", "CR(EG)", "CR(HM)", "size FL (KB)",
              "size EG (KB)", "bits/w EG", "mean nu"]
    lines = [[f"{r['gamma']:g}", r["training"], pm(r, "test"), pm(r, "test_quantized"), pm(r, "cr_eg", 2),
              pm(r, "cr_huffman", 2), pm(r, "kb_fl", 1), pm(r, "kb_eg", 1), pm(r, "bpw_eg", 2), pm(r, "nu_mean", 2)]
             for r in agg]
    write_text(out / "table2.md", markdown_table(header, lines))
    for key, ylabel in (("test", "test accuracy"), ("cr_eg", "CR(EG) vs FL")):
        series = {t: ([r["gamma"] for r in agg if r["training"] == t], [r[key] for r in agg if r["training"] == t])
                  for t in ("conventional", "backslash")}
        plot_curves(series, out / f"table2_{key}.png", xlabel="init gamma", ylabel=ylabel, logx=True,
                    title=f"BERT on sentiment, {n_seeds} seed(s), mean")
    print(markdown_table(header, lines))


if __name__ == "__main__":
    main()
