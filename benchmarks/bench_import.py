"""Start-up time: ``python -c "import ggprior"`` and ``ggprior --help`` against ``import torch``.

Each figure is the median wall time of ``--repeats`` fresh interpreter runs (so imports are
never cached in-process). ``import ggprior`` must not import torch (checked), and stays under
0.3 s; ``ggprior --help`` under 1 s. ``torch_s`` is the baseline: what one ``import torch``
costs on the same machine in the same run. Prints JSON; ``--out`` also writes it.

    python benchmarks/bench_import.py [--repeats 7] [--out docs/results/benchmarks/bench_import.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "import_ggprior_s": [sys.executable, "-c", "import ggprior, sys; assert 'torch' not in sys.modules"],
    "help_s": [sys.executable, "-m", "ggprior", "--help"],
    "import_torch_s": [sys.executable, "-c", "import torch"],
    "python_s": [sys.executable, "-c", "pass"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for cmd in CASES.values():  # warm the file cache once
        wall(cmd)
    times = {k: [wall(cmd) for _ in range(args.repeats)] for k, cmd in CASES.items()}
    out = {k: round(statistics.median(v), 4) for k, v in times.items()}
    out["help_vs_torch"] = round(out["help_s"] / out["import_torch_s"], 3)
    out["import_vs_torch"] = round(out["import_ggprior_s"] / out["import_torch_s"], 3)
    out.update(repeats=args.repeats, python=platform.python_version(), cpus=os.cpu_count(),
               targets={"import_ggprior_s": 0.3, "help_s": 1.0})
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
