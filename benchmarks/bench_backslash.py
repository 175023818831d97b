"""BackSlash step overhead against plain training, measured in the same run.

Trains a small BERT classifier on random tokens with the real trainer, once plain and once with
each rate callback (BackSlash pooled nu, per-tensor nu, fixed-nu L1 and L2), interleaved and
repeated; reports the best seconds per step of each and the ratio to plain training. Wall-clock
ratios on a shared machine swing by +-10%, so ``cpu_time`` also gives the CPU time
(``time.process_time``, one thread) of a plain step and of each rate step on the same model, and
(plain + rate) / plain: the figure the <= 1.05x goal is read from.

    python benchmarks/bench_backslash.py [--scale 1] [--steps 40] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from ggprior.tasks import TaskData, build_model, count_parameters
from ggprior.train import TrainConfig, make_rate_callback, train

VARIANTS = {"plain": None, "backslash": ("backslash", False), "backslash_per_tensor": ("backslash", True),
            "l1": ("l1", False), "l2": ("l2", False)}


def _data(n: int, seq: int, vocab: int) -> TaskData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return TaskData("random", "train", "classification", {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)},
        num_labels=2)


def seconds_per_step(variant: str, data: TaskData, cfg: TrainConfig, scale: int, vocab: int) -> float:
    torch.manual_seed(0)
    model = build_model("bert", "classification", vocab_size=vocab, scale=scale)
    spec = VARIANTS[variant]
    cbs = [] if spec is None else [make_rate_callback(spec[0], 10.0, per_tensor=spec[1])]
    res = train(model, data, None, cfg, cbs)
    return res["history"][0]["seconds"] / res["steps"]


def cpu_ratio(data: TaskData, cfg: TrainConfig, scale: int, vocab: int, steps: int) -> dict:
    """CPU time (``time.process_time``, one thread: robust to other processes' load) of a plain step,
    and of each variant's rate step on the same model; ratio = (plain + rate step) / plain."""
    import time

    from ggprior.tasks import batches

    torch.manual_seed(0)
    model = build_model("bert", "classification", vocab_size=vocab, scale=scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iter(batches(data, cfg.batch_size))
    batch_list = [next(it) for _ in range(min(steps, len(data) // cfg.batch_size))]

    def plain_step(b):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batch_list[:3]:
        plain_step(b)
    t0 = time.process_time()
    for b in batch_list:
        plain_step(b)
    plain = (time.process_time() - t0) / len(batch_list)
    out = {"plain_step_cpu_ms": 1e3 * plain, "rate_step_cpu_ms": {}, "ratio_vs_plain": {}}
    for v, spec in VARIANTS.items():
        if spec is None:
            continue
        cb = make_rate_callback(spec[0], 1e-6, per_tensor=spec[1])  # tiny lambda: the same work, weights kept
        cb.on_train_begin(model, steps)
        cb.step_(1)
        reps = 50
        t0 = time.process_time()
        for i in range(reps):
            cb.step_(i + 2)
        rate = (time.process_time() - t0) / reps
        out["rate_step_cpu_ms"][v] = 1e3 * rate
        out["ratio_vs_plain"][v] = (plain + rate) / plain
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.steps * args.batch_size, args.seq, args.vocab)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device=args.device, progress=False)
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # interleaved so that load changes hit every variant alike
            best[v] = min(best[v], seconds_per_step(v, data, cfg, args.scale, args.vocab))
    params = count_parameters(build_model("bert", "classification", vocab_size=args.vocab, scale=args.scale))
    out = {
        "benchmark": "backslash_step_overhead", "model": f"bert scale {args.scale}", "parameters": params,
        "steps": args.steps, "batch_size": args.batch_size, "seq": args.seq, "repeats": args.repeats,
        "threads": args.threads, "device": args.device, "machine": platform.machine(),
        "seconds_per_step": best,
        "ratio_vs_plain": {v: best[v] / best["plain"] for v in VARIANTS if v != "plain"},
        "cpu_time": cpu_ratio(data, cfg, args.scale, args.vocab, args.steps),
        "load_average_1min": os.getloadavg()[0],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
