"""How long a pipeline-sized MiniLM fine-tune takes on this CPU (sizes the main job).

    PYTHONPATH=src python experiments/pretrained_timing.py --examples 2000 --epochs 1 --max-len 64

Times, on the sentiment task: tokenising/loading, one plain fine-tune and one BackSlash
(proximal, reference lambda 2e3) fine-tune of ``--examples`` training examples, and the
evaluation of the validation split; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ggprior.tasks import get_tokenizer, load_minilm, load_task
from ggprior.train import TrainConfig, evaluate, make_rate_callback, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--task", default="sentiment")
    a = ap.parse_args()
    out = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), **vars(a)}
    t = time.perf_counter()
    tok = get_tokenizer("minilm")
    tr = load_task(a.task, "train", tok, a.max_len, max_examples=a.examples)
    va = load_task(a.task, "validation", tok, a.max_len)
    out["load_s"] = time.perf_counter() - t
    for name, rate in (("plain", "none"), ("backslash_prox", "backslash")):
        torch.manual_seed(0)
        t = time.perf_counter()
        model = load_minilm(tr.num_labels).float()
        cb = make_rate_callback(rate, 2e3, update="proximal")
        res = train(model, tr, None, TrainConfig(epochs=a.epochs, lr=1e-4, seed=0, progress=False),
                    [cb] if cb else [])
        out[f"{name}_train_s"] = time.perf_counter() - t
        out[f"{name}_steps"] = res["steps"]
        t = time.perf_counter()
        out[f"{name}_val_acc"] = evaluate(model, va)["accuracy"]
        out[f"{name}_eval_s"] = time.perf_counter() - t
    print(json.dumps(out))


if __name__ == "__main__":
    main()
