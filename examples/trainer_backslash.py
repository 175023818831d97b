"""transformers.Trainer + BackSlashCallback: a small BERT (built from a config) on a built-in task.

    python examples/trainer_backslash.py [--task spam] [--lam 1000] [--epochs 3] [--out runs/trainer_backslash]
    python examples/trainer_backslash.py --tiny      # a few seconds: the test suite runs this

Prints one JSON line: validation accuracy, the GG shape nu BackSlash ended with, the fraction of
weights within 1e-3 of zero, and the checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggprior  # noqa: E402
from _common import task_and_model  # noqa: E402
from ggprior.hf import BackSlashCallback  # noqa: E402


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="spam", choices=["sentiment", "spam", "topic"])
    ap.add_argument("--lam", type=float, default=1000.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=0.1, help="GG init shape (2 = He init)")
    ap.add_argument("--out", default="runs/trainer_backslash")
    ap.add_argument("--tiny", action="store_true", help="64 examples, 16 tokens, 1 epoch")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    train, val, model = task_and_model(args.task, tiny=args.tiny)
    ggprior.gg_init_(model, gamma=args.gamma)
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=1 if args.tiny else args.epochs, per_device_train_batch_size=16 if args.tiny else 32,
        per_device_eval_batch_size=64, learning_rate=1e-3, warmup_steps=0.1, logging_steps=5, save_strategy="epoch",
        eval_strategy="epoch", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
    )
    rate = BackSlashCallback(args.lam)
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
                      callbacks=[rate])
    trainer.train()
    metrics = trainer.evaluate()
    w = torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() >= 2])
    out = {"task": args.task, "lam": args.lam, "accuracy": metrics["eval_accuracy"], "steps": trainer.state.global_step,
           "nu_last": rate.nu_last[0], "near_zero_frac": float((w.abs() < 1e-3).float().mean()),
           "history": rate.history, "out": args.out}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
