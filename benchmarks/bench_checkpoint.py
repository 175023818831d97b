"""Real-size checkpoints: compress / decompress a synthetic sharded bf16 checkpoint, wall time and peak memory.

Writes a Hugging Face style folder of ``--gb`` GB of bf16 weights (``--tensors`` tensors of
``--values`` values each, GG-like, ``--shard-gb`` shards with a ``model.safetensors.index.json``),
then runs ``ggprior compress`` and ``ggprior decompress`` (to a folder) in fresh subprocesses with
``--jobs 1`` and ``--jobs`` = every core (torch's and numba's own threads set to 1 with ``GGPRIOR_THREADS=1``, so ``--jobs`` is
the only parallelism). For each run: wall time, CPU time, the time of the imports (torch, ...) and
of the work after them, weights/s and the peak RSS of the subprocess (its ``VmHWM``), against the
goal peak RSS <= 0.5 GB + 4 x the largest tensor's float32 size; the decode speedup of all jobs over
one job (of the wall time, and of the work after the imports) against the goal >= 1.8x on 2 cores;
whether the ``.ggz`` files and the decoded folders are byte-identical across job counts; the load
average before and after. Everything is written under ``--tmp`` and deleted afterwards. Prints
JSON; ``--out`` also writes it.

    flock /tmp/ggprior-heavy.lock python benchmarks/bench_checkpoint.py --out docs/results/checkpoints/bench_checkpoint.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

GB = 1e9


def write_checkpoint(folder: Path, tensors: int, values: int, shard_bytes: float, seed: int) -> int:
    """A sharded bf16 checkpoint of Laplace-like weights; returns the largest tensor's values."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    per_shard = max(1, int(shard_bytes // (2 * values)))
    names = [f"layers.{i}.weight" for i in range(tensors)]
    groups = [names[i : i + per_shard] for i in range(0, tensors, per_shard)]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in group:
            x = torch.empty(values // 4096, 4096, dtype=torch.float32).exponential_(generator=g)
            x *= torch.where(torch.rand(x.shape, generator=g) < 0.5, -0.02, 0.02)  # Laplace, scale 0.02
            shard[name] = x.to(torch.bfloat16)
            del x
            weight_map[name] = fname
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": 2 * values * tensors}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "n": tensors}))
    return values


HWM = """import runpy, sys, time
t0 = time.perf_counter()
import ggprior.cli.app, ggprior.codec.checkpoint, ggprior.codec.writer  # noqa: E401  (start-up, timed apart)
t1 = time.perf_counter()
sys.argv = ['ggprior', *sys.argv[1:]]
try:
    runpy.run_module('ggprior', run_name='__main__')
finally:
    print(f"IMPORT {t1 - t0:.3f} WORK {time.perf_counter() - t1:.3f}", file=sys.stderr)
    print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)
"""


def run(cmd: list[str]) -> dict:
    """Run ``ggprior`` with the arguments ``cmd`` in a subprocess; wall time, CPU time and peak RSS (GB).

    The peak is the child's own ``VmHWM``: ``ru_maxrss`` of a child also counts the parent's memory
    at the fork, so it is only an upper bound."""
    cmd = [sys.executable, "-c", HWM, *cmd]
    t0 = time.perf_counter()
    # parallelism is --jobs alone: the CLI sets torch's and numba's threads from GGPRIOR_THREADS (else from the idle CPUs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GGPRIOR_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    hwm = int(err.rsplit("VmHWM:", 1)[1].split()[0]) * 1024
    imports, work = (float(x) for x in err.rsplit("IMPORT", 1)[1].split()[:3:2])
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "import_s": round(imports, 2),
            "work_s": round(work, 2), "peak_rss_gb": round(hwm / GB, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--values", type=int, default=1 << 26, help="values per tensor (a multiple of 4096)")
    ap.add_argument("--shard-gb", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=Path("runs/bench_checkpoint"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.tmp.exists():
        shutil.rmtree(args.tmp)
    jobs_all = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    try:
        src = args.tmp / "src"
        t0 = time.perf_counter()
        largest = write_checkpoint(src, args.tensors, args.values, args.shard_gb * GB, args.seed)
        write_s = time.perf_counter() - t0
        n = args.tensors * args.values
        goal_rss = 0.5 + 4 * 4 * largest / GB
        rows = {}
        for jobs in sorted({1, jobs_all}):
            ggz = args.tmp / f"jobs{jobs}" / "m.ggz"  # one name: it is stored in the decoded files' metadata
            rows[f"compress_jobs{jobs}"] = run(["compress", str(src), str(ggz), "--jobs", str(jobs)])
            rows[f"decompress_jobs{jobs}"] = run(["decompress", str(ggz), str(args.tmp / f"out{jobs}"),
                                                  "--jobs", str(jobs), "--max-shard-size", "1GB"])
            for k in (f"compress_jobs{jobs}", f"decompress_jobs{jobs}"):
                r = rows[k]
                r.update(weights_per_s=round(n / r["wall_s"]), cpu_weights_per_s=round(n / r["cpu_s"]),
                         rss_goal_met=r["peak_rss_gb"] <= goal_rss)
            rows[f"compress_jobs{jobs}"]["file_gb"] = round(ggz.stat().st_size / GB, 4)
            rows[f"compress_jobs{jobs}"]["bits_per_weight"] = round(8 * ggz.stat().st_size / n, 4)
        outs = [args.tmp / f"out{j}" for j in sorted({1, jobs_all})]
        decoded_same = all(sorted(p.name for p in o.iterdir()) == sorted(p.name for p in outs[0].iterdir())
                           and all(filecmp.cmp(p, outs[0] / p.name, shallow=False) for p in o.iterdir()) for o in outs)
        load_after = os.getloadavg()
        files = {f"jobs{j}/m.ggz" for j in {1, jobs_all}}
        same = len({(args.tmp / f).read_bytes() for f in files}) == 1
        result = {
            "benchmark": "bench_checkpoint",
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": {"cpus": jobs_all, "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                        "load_avg_1_5_15_after": [round(x, 2) for x in load_after]},
            "checkpoint": {"dtype": "bfloat16", "tensors": args.tensors, "values": n, "gb": round(2 * n / GB, 3),
                           "largest_tensor_values": largest, "seed": args.seed, "write_s": round(write_s, 1)},
            "defaults": "ggprior compress (coder ans, the default rule rel_error=0.005, chunks of 4M values); decompress to a folder, 1GB shards; "
                        "OMP_NUM_THREADS=1, GGPRIOR_THREADS=1",
            "goal_peak_rss_gb": round(goal_rss, 3),
            "runs": rows,
            "files_identical_across_jobs": same,
            "decoded_identical_across_jobs": decoded_same,
        }
        if jobs_all > 1:
            for what in ("compress", "decompress"):
                one, all_ = rows[f"{what}_jobs1"], rows[f"{what}_jobs{jobs_all}"]
                result[f"{what}_speedup_all_jobs"] = round(one["wall_s"] / all_["wall_s"], 3)
                result[f"{what}_speedup_all_jobs_after_imports"] = round(one["work_s"] / all_["work_s"], 3)
            result["decode_speedup_goal_met"] = result["decompress_speedup_all_jobs"] >= 1.8
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
