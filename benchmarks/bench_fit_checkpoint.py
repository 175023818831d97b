"""``ggprior fit`` on a 110M-parameter checkpoint: wall time against one plain read of every tensor.

    python benchmarks/bench_fit_checkpoint.py [--checkpoint DIR] [--repeat 3] [--out FILE]

The checkpoint is a BERT-base-shaped model (transformers ``BertConfig()`` defaults, random
init, seed 0, 109,482,240 float32 parameters) saved by ``save_pretrained`` to
``/tmp/ggprior-bert-base-random`` unless ``--checkpoint`` names another folder. Timed in
fresh processes (the command a user runs, imports included): ``ggprior fit CKPT OUT``
(default settings), the same with the old goodness-of-fit sample of 2^20 values per row, and
the baseline, one process that imports torch and sums every tensor of the file once in
float64. Goal: fit <= 15 s on 2 cores. Prints JSON (median wall and CPU seconds of ``--repeat``
runs, with ratios against the baseline, and the load average before and after), also written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(tempfile.gettempdir()) / "ggprior-bert-base-random"
READ_ALL = """
import sys, torch
from safetensors import safe_open
with safe_open(sys.argv[1], framework="pt") as f:
    total = sum(float(f.get_tensor(k).sum(dtype=torch.float64)) for k in f.keys())
"""


def build(folder: Path) -> Path:
    """Write the synthetic BERT-base checkpoint (once)."""
    if not (folder / "model.safetensors").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig()).save_pretrained(folder, safe_serialization=True)
    return folder


def timed(cmd: list[str], repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (user + system of the child) of ``repeat`` runs of ``cmd``."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results"
                    / "benchmarks" / "bench_fit_checkpoint.json")
    a = ap.parse_args()
    folder = build(a.checkpoint)
    py = sys.executable
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        timings = {
            "read_every_tensor_once": timed([py, "-c", READ_ALL, str(folder / "model.safetensors")], a.repeat),
            "ggprior_fit": timed([py, "-m", "ggprior", "fit", str(folder), f"{tmp}/a"], a.repeat),
            "ggprior_fit_gof_2e20": timed([py, "-m", "ggprior", "fit", str(folder), f"{tmp}/b", "--gof-values",
                                           str(1 << 20)], a.repeat),
        }
    runs = {k: w for k, (w, _) in timings.items()}
    cpu = {k: statistics.median(c) for k, (_, c) in timings.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["read_every_tensor_once"]
    result = {
        "command": "python benchmarks/bench_fit_checkpoint.py " + " ".join(sys.argv[1:]),
        "checkpoint": "transformers BertConfig() defaults, random init (seed 0), float32, 109,482,240 parameters",
        "cpus": len(os.sched_getaffinity(0)), "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_at_end": os.getloadavg(),
        "seconds_median": med, "seconds_all": runs, "cpu_seconds_median": cpu,
        "ratio_vs_read": {k: v / base for k, v in med.items()},
        "goal_fit_s": 15.0, "goal_met": med["ggprior_fit"] <= 15.0,
    }
    text = json.dumps(result, indent=1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
