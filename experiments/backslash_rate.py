"""BackSlash rate-accuracy curves: bits/weight against test accuracy for several lambda, with L1/L2 baselines.

For each classification task (sentiment, spam, topic) a small BERT (He init) is trained
conventionally, with BackSlash (adaptive nu, eps 1) at several lambda, and with the fixed-shape
baselines L1 (nu = 1) and L2 (nu = 2, eps 0: decoupled weight decay). The rate is applied in
all but the last epoch (BackSlash epochs, then plain training). Every model is measured at the
fixed quantization step of ``ggprior.train.run`` (2^-8, matrices): EG and Huffman bits/weight,
and the accuracy of the quantized model.

    python experiments/backslash_rate.py [--quick] [--out DIR] [--jobs N] [--seeds S]
"""

from __future__ import annotations

import time

from _common import aggregate, markdown_table, meta, pm, run_grid, study_args, write_outputs
from ggprior.io.atomic import write_text
from ggprior.report.plots import plot_curves
from ggprior.train import TrainConfig
from ggprior.train.run import QUANT_STEP, RunConfig

SIZES = {
    "quick": dict(tasks=("spam",), max_train=96, max_eval=64, epochs=2, max_len=32,
                  lams={"backslash": (100.0,), "l1": (100.0,), "l2": (300.0,)}),
    "full": dict(tasks=("sentiment", "spam", "topic"), max_train=600, max_eval=400, epochs=3, max_len=64,
                 lams={"backslash": (300.0, 1000.0, 3000.0), "l1": (100.0, 300.0), "l2": (1000.0, 10000.0)}),
}
METRICS = ["test", "test_quantized", "bpw_eg", "bpw_huffman", "bpw_entropy", "cr_eg", "cr_huffman", "nu_mean",
           "seconds"]


def grid(size: dict, seeds: list[int]) -> list[tuple[dict, RunConfig]]:
    out = []
    settings = [("none", 0.0)] + [(r, lam) for r, lams in size["lams"].items() for lam in lams]
    for task in size["tasks"]:
        for rate, lam in settings:
            for seed in seeds:
                cfg = RunConfig(task=task, model="bert", init="he", rate=rate, lam=lam,
                                rate_epochs=None if rate == "none" else size["epochs"] - 1,
                                max_train=size["max_train"], max_eval=size["max_eval"], max_len=size["max_len"],
                                train=TrainConfig(epochs=size["epochs"], lr=2e-3, seed=seed))
                out.append(({}, cfg))
    return out


def main() -> None:
    args = study_args(__doc__, "backslash_rate")
    size = SIZES["quick" if args.quick else "full"]
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    started = time.time()
    rows = run_grid(grid(size, seeds), args.jobs)
    agg = aggregate(rows, ["task", "rate", "lam"], METRICS)
    m = meta(seeds, started, size={k: v for k, v in size.items()}, quant_step=QUANT_STEP, model="bert scale 1",
             init="he")
    write_outputs(args.out, "backslash_rate", rows, agg, m)
    render(args.out, agg, size["tasks"], len(seeds))
    print(f"wall {m['wall_seconds']} s; command: {m['command']}")


def render(out, agg: list[dict], tasks, n_seeds: int) -> None:
    """Plots and the Markdown table from the aggregated rows."""
    for task in tasks:
        series = {}
        for rate in ("none", "backslash", "l1", "l2"):
            pts = sorted((r["bpw_eg"], r["test"]) for r in agg if r["task"] == task and r["rate"] == rate)
            if pts:
                series[rate if rate != "none" else "conventional"] = ([p[0] for p in pts], [p[1] for p in pts])
        plot_curves(series, out / f"rate_accuracy_{task}.png", xlabel="bits/weight (EG, step 2^-8)",
                    ylabel="test accuracy", title=f"{task}: BERT scale 1, {n_seeds} seed(s), mean")
    header = ["task", "rate", "lambda", "test acc", "quantized acc", "bits/w EG", "bits/w HM", "CR(EG)", "CR(HM)",
              "mean nu"]
    lines = [[r["task"], r["rate"], f"{r['lam']:g}", pm(r, "test"), pm(r, "test_quantized"), pm(r, "bpw_eg", 2),
              pm(r, "bpw_huffman", 2), pm(r, "cr_eg", 2), pm(r, "cr_huffman", 2), pm(r, "nu_mean", 2)] for r in agg]
    write_text(out / "backslash_rate_table.md", markdown_table(header, lines))
    print(markdown_table(header, lines))


if __name__ == "__main__":
    main()
