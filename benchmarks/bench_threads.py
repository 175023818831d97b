"""A backward pass after ``ggprior.threads.configure_threads`` (as every CLI command starts) against plain torch.

Each case is a fresh interpreter: ``cli_order`` calls ``configure_threads(n)`` before anything imports torch, as
the CLI's root callback does; ``torch_only`` imports torch and calls ``torch.set_num_threads(n)``. The workload
is one calibration step of a 4-layer SmolLM2-shaped ``LlamaForCausalLM`` (random weights, 256 tokens, labels drawn
from its softmax, fwd + bwd), as ``ggprior compress --calibration`` runs it. ``numba_first`` is the order the CLI had before (numba's OpenMP
pool started, then torch imported), kept as the case the goal guards against.
Goal: ``ratio_cli_over_torch`` (CPU seconds per step) <= 1.1. Prints JSON; ``--out`` also writes it.

    python benchmarks/bench_threads.py [--threads 2] [--steps 6] [--out docs/results/benchmarks/bench_threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

WORK = """
import time
{setup}
import transformers
cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
torch.manual_seed(0)
m = transformers.LlamaForCausalLM(cfg)
ids = torch.randint(0, 49152, (1, 256))
def step():
    logits = m(ids).logits[0].float()
    y = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
    torch.nn.functional.cross_entropy(logits, y).backward()
step()
c0, w0 = time.process_time(), time.perf_counter()
for _ in range({steps}):
    step()
print((time.process_time() - c0) / {steps}, (time.perf_counter() - w0) / {steps}, torch.get_num_threads())
"""

SETUP = {
    "cli_order": "from ggprior.threads import configure_threads\nconfigure_threads({n})\nimport torch",
    "torch_only": "import torch\ntorch.set_num_threads({n})",
    "numba_first": "import numba\nnumba.set_num_threads({n})\nimport torch\ntorch.set_num_threads({n})",
}


def run(case: str, n: int, steps: int) -> dict:
    code = WORK.format(setup=SETUP[case].format(n=n), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return {"cpu_s_per_step": float(out[0]), "wall_s_per_step": float(out[1]), "torch_threads": int(out[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    res = {case: run(case, a.threads, a.steps) for case in SETUP}
    ratio = res["cli_order"]["cpu_s_per_step"] / res["torch_only"]["cpu_s_per_step"]
    d = {"benchmark": "bench_threads", "threads": a.threads, "steps": a.steps, **res,
         "ratio_cli_over_torch": ratio, "ratio_wall_cli_over_torch":
         res["cli_order"]["wall_s_per_step"] / res["torch_only"]["wall_s_per_step"],
         "goal_ratio_le_1.1": ratio <= 1.1,
         "ratio_numba_first_over_torch": res["numba_first"]["cpu_s_per_step"] / res["torch_only"]["cpu_s_per_step"], "load_avg_1min": os.getloadavg()[0], "machine": platform.machine(),
         "cpus": os.cpu_count()}
    text = json.dumps(d, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
