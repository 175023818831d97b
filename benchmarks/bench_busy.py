"""Training speed on a busy machine: torch's default threads against ggprior.threads.configure_threads.

    python benchmarks/bench_busy.py [--seconds 8] [--out FILE.json]

A small MLP classifier (512 -> 1024 -> 1024 -> 2, GELU, AdamW, batch 128) trains for
``--seconds`` in a fresh process per measurement (so every run starts from the library
defaults), in four settings: idle or with one competing busy process (a Python busy loop
started by this script), times torch's default intra-op threads or ``configure_threads()``
(affinity, cgroup quota, idle CPUs). Reports steps/s (wall) and process CPU seconds per step,
and the slowdown of each busy run against the idle run with default threads (the user's
experience before). Goal: <= 2.5x slower with one busy process. ``load_avg_1min`` is the
machine's load at the start (run it when nothing else runs, e.g. under the project's
heavy-job lock).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(mode: str, seconds: float) -> dict:
    import torch
    from torch import nn

    if mode == "configured":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from ggprior.threads import configure_threads

        threads = configure_threads()
    else:
        threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(128, 512)
    y = torch.randint(0, 2, (128,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": mode, "threads": threads, "steps": steps, "steps_per_s": steps / wall, "cpu_s_per_step": cpu / steps}


def run_child(mode: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--seconds", str(seconds)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seconds)))
        return
    load = os.getloadavg()[0]
    res = {"idle": {}, "busy": {}}
    for mode in ("default", "configured"):
        res["idle"][mode] = run_child(mode, args.seconds)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        for mode in ("default", "configured"):
            res["busy"][mode] = run_child(mode, args.seconds)
    finally:
        busy.terminate()
        busy.wait()
    base = res["idle"]["default"]["steps_per_s"]
    slow = {f"{cond}_{mode}": base / r["steps_per_s"] for cond in res for mode, r in res[cond].items()}
    text = json.dumps({
        "benchmark": "bench_busy", "seconds": args.seconds, "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)), "load_avg_1min": load, "runs": res,
        "slowdown_vs_idle_default": slow,
        "cpu_per_step_busy_over_idle_default": res["busy"]["default"]["cpu_s_per_step"]
        / res["idle"]["default"]["cpu_s_per_step"],
        "cpu_per_step_busy_over_idle_configured": res["busy"]["configured"]["cpu_s_per_step"]
        / res["idle"]["default"]["cpu_s_per_step"],
        "goal_busy_configured_le_2.5x": slow["busy_configured"] <= 2.5,
    }, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
