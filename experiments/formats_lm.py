"""Table 7 at our scale: small causal LMs, conventional and BackSlash-trained, evaluated in every number format.

The paper claims RF8 keeps near-FP16 quality for BackSlash-trained generative models while
conventionally trained ones degrade in RF8. Two GPT-2-style LMs (0.4M parameters, BBC news
corpus, 4096-token BPE) are trained from the same seed, plain and with BackSlash, then every
linear layer is converted to each format (``ggprior.formats.convert``) and the test perplexity
measured. Writes formats_lm.{json,md} and a plot under --out.

    python experiments/formats_lm.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ggprior import formats
from ggprior.io.atomic import write_text
from ggprior.report.plots import plt, save_figure
from ggprior.train import TrainConfig, evaluate
from ggprior.train.run import RunConfig, build, make_rate_callback, train

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("fp16", "bf16", "fp8-e4m3", "fp8-e4m3-scaled", "fp8-e5m2", "int8", "rf8", "rf8-round")
TRAININGS = {"conventional": ("none", 0.0), "backslash": ("backslash", 1000.0)}


def one_run(training: str, seed: int, quick: bool) -> dict:
    rate, lam = TRAININGS[training]
    epochs = 1 if quick else 3
    cfg = RunConfig(task="bbc-lm", model="gpt2", init="he", rate=rate, lam=lam,
                    rate_epochs=None if rate == "none" else max(1, epochs - 1), max_len=64,
                    max_train=64 if quick else 1500, max_eval=32 if quick else 300,
                    train=TrainConfig(epochs=epochs, lr=2e-3, seed=seed, progress=False))
    cfg.validate()
    _, (train_data, val_data, test_data), model = build(cfg)
    callbacks = [cb for cb in [make_rate_callback(cfg.rate, cfg.lam, epochs=cfg.rate_epochs)] if cb is not None]
    train(model, train_data, val_data, cfg.train, callbacks)
    row = {"training": training, "seed": seed, "fp32": evaluate(model, test_data)["perplexity"]}
    for fmt in FORMATS:
        row[fmt] = evaluate(formats.to_format(copy.deepcopy(model), fmt), test_data)["perplexity"]
    return row


def table(rows: list[dict]) -> str:
    cols = ["fp32", *FORMATS]
    lines = ["| training | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for training in TRAININGS:
        runs = [r for r in rows if r["training"] == training]
        cells = []
        for c in cols:
            v = np.array([r[c] for r in runs])
            rel = np.array([r[c] / r["fp32"] - 1 for r in runs])
            spread = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
            cells.append(f"{v.mean():.1f}{spread}" + ("" if c == "fp32" else f" ({rel.mean():+.1%})"))
        lines.append(f"| {training} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for i, training in enumerate(TRAININGS):
        runs = [r for r in rows if r["training"] == training]
        ys = [100 * float(np.mean([r[f] / r["fp32"] - 1 for r in runs])) for f in FORMATS]
        ax.bar(np.arange(len(FORMATS)) + i * width, ys, width, label=training)
    ax.set_xticks(np.arange(len(FORMATS)) + width / 2, FORMATS, rotation=30)
    ax.set_ylabel("perplexity change vs fp32 (%)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.legend()
    ax.set_title("Small GPT-2 LMs on BBC news: quality in each number format")
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "formats_lm")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [one_run(t, s, args.quick) for s in range(args.seeds) for t in TRAININGS]
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "formats_lm.json", json.dumps({"rows": rows, "seconds": seconds}, indent=1) + "\n")
    plot(rows, args.out / "formats_lm.png")
    cmd = "python experiments/formats_lm.py" + (" --quick" if args.quick else "") + f" --seeds {args.seeds}"
    md = (f"# Small LMs (conventional vs BackSlash) in every number format\n\nCommand: `{cmd}` "
          f"(seeds 0..{args.seeds - 1}, {seconds:.0f} s). Test perplexity, mean ± std over seeds, "
          f"change against the same model in fp32 in brackets.\n\n{table(rows)}\n\n![formats](formats_lm.png)\n")
    write_text(args.out / "formats_lm.md", md)
    print(md)
    assert all(math.isfinite(r["fp32"]) for r in rows)


if __name__ == "__main__":
    main()
