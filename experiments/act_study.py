"""ACT study: coded bits per token of inter-block activations, sparsity and accuracy, plain vs ACT.

For each task (sentiment, spam, topic) a small BERT is trained plainly and with ACT at each lam
(same data, seed, steps); then on the test split: accuracy, accuracy with every block output
quantized at the fixed step, and the inter-block activations' rANS-coded bits per token, entropy
and zero fraction at that step (``ggprior.train.act``).

    python experiments/act_study.py [--quick] [--out docs/results/act] [--lams 0.3 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ggprior.io.atomic import write_text
from ggprior.io.tables import write_table
from ggprior.report.plots import save_figure
from ggprior.tasks import get_tokenizer, load_task
from ggprior.tasks.models import build_model
from ggprior.train import TrainConfig, train
from ggprior.train.act import ACT, STEP, activation_bits, quantized_activations

TASKS = ("sentiment", "spam", "topic")
SIZES = {
    "quick": dict(max_train=256, max_eval=128, epochs=1),
    "full": dict(max_train=3000, max_eval=600, epochs=2),
}


def one(task: str, lam: float, size: str, seed: int) -> dict:
    s = SIZES[size]
    tok = get_tokenizer("bpe", task, 4096)
    tr, va, te = (load_task(task, split, tok, 64, max_examples=s["max_train"] if split == "train" else s["max_eval"])
                  for split in ("train", "validation", "test"))
    torch.manual_seed(seed)
    model = build_model("bert", "classification", vocab_size=tok.vocab_size, num_labels=max(tr.num_labels, 2),
                        max_positions=64, pad_id=tok.pad_id, scale=1)
    cfg = TrainConfig(epochs=s["epochs"], batch_size=32, lr=2e-3, warmup=0.1, seed=seed, progress=False)
    act = ACT(lam, eps=0.1, ramp=0.3, layer_power=1.0) if lam > 0 else None
    res = train(model, tr, va, cfg, [act] if act else [], test_data=te)
    if act:
        act.remove()
    bits = activation_bits(model, te, STEP)
    qa = quantized_activations(model, te, STEP)
    last = res["history"][-1]
    return {"task": task, "lam": lam, "test_accuracy": res["test"]["accuracy"], "quantized_act_accuracy": qa["accuracy"],
            "bits_per_token": bits["bits_per_token"], "entropy_bits_per_token": bits["entropy_bits_per_token"],
            "fp32_bits_per_token": bits["fp32_bits_per_token"], "zero_frac": bits["zero_frac"], "rms": bits["rms"],
            "act_nu_mean": last.get("act_nu_mean"), "train_seconds": res["seconds"],
            "per_block_bits": [round(b["bits_per_value"], 4) for b in bits["per_block"]]}


def plot(rows: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4))
    for ax, task in zip(axes, TASKS, strict=True):
        rs = [r for r in rows if r["task"] == task]
        for r in rs:
            ax.scatter(r["bits_per_token"], r["test_accuracy"], s=40)
            ax.annotate(f"lam={r['lam']:g}", (r["bits_per_token"], r["test_accuracy"]), fontsize=8)
        ax.set_xlabel(f"coded bits / token (block outputs, step {STEP:g})")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/results/act"))
    ap.add_argument("--lams", type=float, nargs="+", default=[0.3, 1.0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = "quick" if args.quick else "full"
    rows, t0 = [], time.perf_counter()
    for task in args.tasks:
        base = None
        for lam in [0.0, *args.lams]:
            t = time.perf_counter()
            r = one(task, lam, size, args.seed)
            base = base or r
            r["bits_saved_vs_plain"] = 1 - r["bits_per_token"] / base["bits_per_token"]
            r["accuracy_vs_plain"] = r["test_accuracy"] - base["test_accuracy"]
            rows.append(r)
            print(f"{task} lam={lam}: {json.dumps(r)} ({time.perf_counter() - t:.0f} s)", flush=True)
    cmd = (f"python experiments/act_study.py{' --quick' if args.quick else ''} --out {args.out} "
           f"--lams {' '.join(f'{v:g}' for v in args.lams)} --tasks {' '.join(args.tasks)} --seed {args.seed}")
    write_table(rows, args.out, "act", title="ACT vs plain training (inter-block activations)")
    write_text(args.out / "meta.json", json.dumps({"command": cmd, "size": SIZES[size], "step": STEP,
                                                   "seconds": time.perf_counter() - t0}, indent=1) + "\n")
    if set(args.tasks) == set(TASKS):
        plot(rows, args.out / "act.png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
