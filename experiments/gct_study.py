"""GCT study: bytes per step, accuracy and wall time of data-parallel training, one run per method.

Methods, all in the same invocation, same data, seed and steps: plain DDP (fp32 allreduce), torch's
fp16 compression hook, torch's PowerSGD hook (rank 2, error feedback, 10 plain steps first), GCT
(rANS-coded quantized gradients with error feedback; step = rel_step x RMS of the bucket, three
steps) and GCT with the rate constraint (the rate-constrained quantizer, lam > 0) with and without
the secant gradient-rate term.

    python experiments/gct_study.py [--quick] [--out docs/results/gct] [--workers 2]

Under torchrun, one method per launch (worker 0 prints its JSON):

    torchrun --nproc-per-node 2 experiments/gct_study.py --method gct --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ggprior.gct import GCTConfig, from_env
from ggprior.gct.train import DPConfig, data_parallel, main_torchrun
from ggprior.io.atomic import write_text
from ggprior.io.tables import write_table
from ggprior.report.plots import save_figure
from ggprior.train.loop import TrainConfig

RUNS = {
    "allreduce": ("allreduce", {}),
    "fp16": ("fp16", {}),
    "powersgd": ("powersgd", {}),
    "gct-coarse": ("gct", {"coder": "ans", "rel_step": 0.5}),
    "gct": ("gct", {"coder": "ans", "rel_step": 0.05}),
    "gct-fine": ("gct", {"coder": "ans", "rel_step": 0.02}),
    "gct-fine-rate": ("gct", {"coder": "ans", "rel_step": 0.02, "lam": 0.5}),
    "gct-fine-rate-secant": ("gct", {"coder": "ans", "rel_step": 0.02, "lam": 0.5, "grad_rate": 0.01}),
}
SIZES = {  # per-worker batch 16; every run sees the same examples in the same order
    "quick": dict(max_train=256, max_eval=128, epochs=1),
    "full": dict(max_train=2400, max_eval=1000, epochs=2),
}


def config(name: str, size: str, task: str, seed: int) -> DPConfig:
    method, gct = RUNS[name]
    s = SIZES[size]
    return DPConfig(method=method, task=task, model="bert", scale=1, max_len=64, max_train=s["max_train"],
                    max_eval=s["max_eval"], gct=GCTConfig(**gct), powersgd_rank=2, powersgd_start=10, timeout=300,
                    train=TrainConfig(epochs=s["epochs"], batch_size=16, lr=2e-3, warmup=0.1, seed=seed,
                                      progress=False))


def row(name: str, res: list[dict]) -> dict:
    lead = res[0]
    c, m = lead["comm"], lead["metrics"]
    return {"method": name, "test_accuracy": m["test"]["accuracy"],
            "validation_accuracy": m["history"][-1]["validation_accuracy"], "steps": lead["steps"],
            "bytes_per_step": c["bytes_per_step"], "wire_bytes_per_step": c["wire_bytes_per_step"],
            "bits_per_value": c["bits_per_value"], "eg0_bytes_per_step": c["eg0_bytes_per_step"] or None,
            "entropy_bytes_per_step": c["entropy_bytes_per_step"] or None, "zero_frac": c["zero_frac"],
            "seconds_per_step": max(r["seconds_per_step"] for r in res), "hook_ms_per_step": c["hook_ms_per_step"],
            "values_per_step": lead["values_per_step"]}


def plot(rows: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [r["method"] for r in rows]
    for ax, key, label in zip(axes, ("bytes_per_step", "test_accuracy", "seconds_per_step"),
                              ("payload bytes / worker / step (log)", "test accuracy", "seconds / step"),
                              strict=True):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=40)
        if key == "bytes_per_step":
            ax.set_yscale("log")
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/results/gct"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--task", default="spam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=sorted(RUNS), help="one method only (required under torchrun)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = "quick" if args.quick else "full"
    if from_env() is not None:
        if args.method is None:
            ap.error("under torchrun give --method")
        out = main_torchrun(config(args.method, size, args.task, args.seed))
        if out is not None:
            print(json.dumps({"method": args.method, **{k: out[k] for k in ("comm", "seconds_per_step", "steps")},
                              "test": out["metrics"]["test"]}))
        return
    names = [args.method] if args.method else list(RUNS)
    rows, t0 = [], time.perf_counter()
    for name in names:
        t = time.perf_counter()
        res = data_parallel(config(name, size, args.task, args.seed), args.workers, deadline=900)
        rows.append(row(name, res))
        print(f"{name}: {json.dumps(rows[-1])} ({time.perf_counter() - t:.0f} s)", flush=True)
    base = next((r for r in rows if r["method"] == "allreduce"), None)
    for r in rows:
        if base is not None:
            r["bytes_saved_vs_fp32"] = 1 - r["bytes_per_step"] / base["bytes_per_step"]
            r["time_vs_fp32"] = r["seconds_per_step"] / base["seconds_per_step"]
            r["accuracy_vs_fp32"] = r["test_accuracy"] - base["test_accuracy"]
    meta = {"command": f"python experiments/gct_study.py{' --quick' if args.quick else ''} --out {args.out} "
                       f"--workers {args.workers} --task {args.task} --seed {args.seed}",
            "size": size, "workers": args.workers, "task": args.task, "seed": args.seed,
            "config": config("gct", size, args.task, args.seed).to_dict(), "seconds": time.perf_counter() - t0}
    write_table(rows, args.out, "gct", title=f"GCT vs DDP baselines ({args.workers} gloo workers, {args.task})")
    write_text(args.out / "meta.json", json.dumps(meta, indent=1) + "\n")
    plot(rows, args.out / "gct.png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
