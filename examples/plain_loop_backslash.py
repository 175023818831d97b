"""BackSlash from a plain PyTorch loop: one call per step after ``optimizer.step()``.

    python examples/plain_loop_backslash.py [--task spam] [--lam 1000] [--epochs 3]
    python examples/plain_loop_backslash.py --tiny

The loop is ordinary PyTorch; the only ggprior lines are the ``BackSlash`` object, its
``on_train_begin`` (which parameters, how many) and ``rate.step_(step)`` after each optimizer step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggprior  # noqa: E402
from _common import task_and_model  # noqa: E402
from ggprior.train import BackSlash  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="spam", choices=["sentiment", "spam", "topic"])
    ap.add_argument("--lam", type=float, default=1000.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    train, val, model = task_and_model(args.task, tiny=args.tiny)
    ggprior.gg_init_(model, gamma=args.gamma)
    epochs = 1 if args.tiny else args.epochs
    loader = DataLoader(train, batch_size=16 if args.tiny else 32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rate = BackSlash(args.lam)                              # adaptive nu, eps 1, every matrix
    rate.on_train_begin(model, epochs * len(loader))
    step = 0
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            rate.step_(step)                                # the rate step: one call per step
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**b).logits for b in DataLoader(val, batch_size=64)])
    acc = float((logits.argmax(-1) == val.tensors["labels"]).float().mean())
    out = {"task": args.task, "lam": args.lam, "steps": step, "accuracy": acc, "nu_last": rate.nu_last[0]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
