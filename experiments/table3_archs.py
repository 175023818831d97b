"""Table 3: GG init (gamma = 0.1) against He init across BERT, GPT-2 and LLaMA styles and the tasks.

Conventional training (no rate term). Classification tasks sentiment, spam and topic for all
three architectures (accuracy), and the BBC language-modelling corpus for the two decoders
(perplexity, byte-level BPE of 4096 tokens trained on its training split). Compression at the
fixed quantization step of ``ggprior.train.run`` (2^-8 on matrices). Mean +- std over seeds.

    python experiments/table3_archs.py [--quick] [--out DIR] [--jobs N] [--seeds S]
"""

from __future__ import annotations

import time

from _common import aggregate, markdown_table, meta, pm, run_grid, study_args, write_outputs
from ggprior.io.atomic import write_text
from ggprior.report.plots import plt, save_figure
from ggprior.train import TrainConfig
from ggprior.train.run import QUANT_STEP, RunConfig

SIZES = {
    "quick": dict(pairs=(("bert", "spam"), ("gpt2", "bbc-lm")), max_train=64, max_eval=32, epochs=1, max_len=32),
    "full": dict(pairs=tuple((a, t) for a in ("bert", "gpt2", "llama") for t in ("sentiment", "spam", "topic"))
                 + (("gpt2", "bbc-lm"), ("llama", "bbc-lm")), max_train=600, max_eval=300, epochs=3, max_len=64),
}
INITS = (("he", 2.0), ("gg", 0.1))
METRICS = ["test", "test_quantized", "cr_eg", "cr_huffman", "kb_fl", "kb_eg", "bpw_eg", "bpw_huffman", "seconds"]


def grid(size: dict, seeds: list[int]) -> list[tuple[dict, RunConfig]]:
    out = []
    for arch, task in size["pairs"]:
        for init, gamma in INITS:
            for seed in seeds:
                cfg = RunConfig(task=task, model=arch, init=init, gamma=gamma, max_train=size["max_train"],
                                max_eval=size["max_eval"], max_len=size["max_len"],
                                train=TrainConfig(epochs=size["epochs"], lr=2e-3, seed=seed))
                out.append(({"init_label": "GG 0.1" if init == "gg" else "He"}, cfg))
    return out


def _plot(agg: list[dict], path, n_seeds: int) -> None:
    labels = [f"{r['model']}\n{r['task']}" for r in agg if r["init_label"] == "He"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.4
    for k, lab in enumerate(("He", "GG 0.1")):
        vals = [r["cr_eg"] for r in agg if r["init_label"] == lab]
        ax.bar([i + (k - 0.5) * width for i in range(len(vals))], vals, width, label=lab)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("CR(EG) vs FL")
    ax.set_title(f"GG 0.1 vs He init, conventional training ({n_seeds} seed(s), mean)")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    args = study_args(__doc__, "table3_archs")
    size = SIZES["quick" if args.quick else "full"]
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    started = time.time()
    rows = run_grid(grid(size, seeds), args.jobs)
    agg = aggregate(rows, ["model", "task", "init_label", "metric"], METRICS)
    m = meta(seeds, started, size=size, quant_step=QUANT_STEP, scale=1)
    write_outputs(args.out, "table3", rows, agg, m)
    render(args.out, agg, len(seeds))
    print(f"wall {m['wall_seconds']} s; command: {m['command']}")


def render(out, agg: list[dict], n_seeds: int) -> None:
    """The plot and the Markdown table from the aggregated rows."""
    header = ["model", "task", "init", "metric", "test", "quantized", "CR(EG)", "CR(HM)", "size FL (KB)",
              "size EG (KB)", "bits/w EG"]
    lines = [[r["model"], r["task"], r["init_label"], r["metric"], pm(r, "test"), pm(r, "test_quantized"),
              pm(r, "cr_eg", 2), pm(r, "cr_huffman", 2), pm(r, "kb_fl", 1), pm(r, "kb_eg", 1), pm(r, "bpw_eg", 2)]
             for r in agg]
    write_text(out / "table3.md", markdown_table(header, lines))
    _plot(agg, out / "table3_cr_eg.png", n_seeds)
    print(markdown_table(header, lines))


if __name__ == "__main__":
    main()
