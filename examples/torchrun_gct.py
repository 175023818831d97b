"""Data-parallel training with GCT-coded gradients, launched with torchrun.

    torchrun --nproc_per_node 2 examples/torchrun_gct.py [--task spam] [--epochs 2] [--exchange auto]
    torchrun --nproc_per_node 2 examples/torchrun_gct.py --trainer      # the same through transformers.Trainer
    torchrun --nproc_per_node 2 examples/torchrun_gct.py --tiny         # a few seconds (the test suite)

Plain DDP: ``register_gct(ddp_model, GCTConfig(...))`` right after wrapping, on every worker.
``--trainer``: ``ggprior.hf.enable_gct(trainer, GCTConfig(...))`` registers the same hook on the
DDP model that Trainer (accelerate) builds. Backend gloo on CPU, nccl on CUDA. Worker 0 prints
one JSON line: accuracy, coded bytes per step against fp32, and whether all workers ended with
identical parameters.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import task_and_model  # noqa: E402
from ggprior.gct import GCTConfig, register_gct  # noqa: E402


def checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def plain_ddp(args, train, val, model, device) -> tuple[float, dict, int]:
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = register_gct(ddp, GCTConfig(exchange=args.exchange, coder=args.coder))
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    ddp.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = ddp(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**{k: v.to(device) for k, v in b.items()}).logits.cpu()
                            for b in DataLoader(val, batch_size=64)])
    acc = float((logits.argmax(-1) == val.tensors["labels"]).float().mean())
    return acc, state.stats.summary(), state.stats.steps


def with_trainer(args, train, val, model) -> tuple[float, dict, int]:
    import numpy as np
    from transformers import Trainer, TrainingArguments

    from ggprior.hf import enable_gct

    targs = TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                              learning_rate=1e-3, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                              use_cpu=not torch.cuda.is_available(), ddp_backend="gloo" if not torch.cuda.is_available()
                              else None, logging_steps=10)
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                      compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
    gct = enable_gct(trainer, GCTConfig(exchange=args.exchange, coder=args.coder))
    trainer.train()
    acc = trainer.evaluate()["eval_accuracy"]
    if gct.state is None:
        raise SystemExit("GCT was not registered: run under torchrun with 2 or more processes")
    return acc, gct.state.stats.summary(), gct.state.stats.steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="spam", choices=["sentiment", "spam", "topic"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--exchange", default="auto", choices=["auto", "allgather", "reduce_scatter"])
    ap.add_argument("--coder", default="ans", choices=["ans", "eg"])
    ap.add_argument("--trainer", action="store_true", help="train with transformers.Trainer + enable_gct")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent worker fails the run")
    ap.add_argument("--out", default="runs/torchrun_gct")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("start with torchrun --nproc_per_node N examples/torchrun_gct.py")
    if args.tiny:
        args.epochs = 1
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not args.trainer:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    train, val, model = task_and_model(args.task, tiny=args.tiny)
    model.to(device)
    if args.trainer:
        acc, comm, steps = with_trainer(args, train, val, model)
    else:
        acc, comm, steps = plain_ddp(args, train, val, model, device)
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, checksum(model))
    if dist.get_rank() == 0:
        values = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(json.dumps({"workers": dist.get_world_size(), "trainer": args.trainer, "steps": steps, "accuracy": acc,
                          "bytes_per_step": comm["bytes_per_step"], "fp32_bytes_per_step": 4 * values,
                          "raw_buckets": comm["raw_buckets"], "in_sync": len(set(sums)) == 1}))
    dist.barrier()
    gc.collect()  # free the DDP model (and its reducer) while the process group still exists
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
