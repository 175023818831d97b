"""Channel scales' cost where users wait: loading (and writing) a channel-scaled ``.ggz`` against the same file
without scales, in the same run.

SmolLM2-shaped float32 matrices (an embedding of 49152 x 576 and one layer's seven matrices), Laplace-like
weights with column scales spanning 4 octaves (seed 0), written by ``save_compressed(rel_error=0.02)`` with and
without channel scales (the codes from ``channel_scales`` on a column Fisher that follows the columns' scales),
then read back by ``load_compressed``; best of 3, wall and CPU time, decoded MB/s (float32 output). Goal: the
scaled file loads at >= 0.8x the plain file's speed.

    flock /tmp/ggprior-heavy.lock python benchmarks/bench_channels.py --out docs/results/benchmarks/bench_channels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of  # noqa: E402
from ggprior.codec import load_compressed, save_compressed  # noqa: E402
from ggprior.codec.channels import channel_scales  # noqa: E402

SHAPES = {"embed": (49152, 576), "q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def model(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(seed)
    tens, scales = {}, {}
    for k, (r, c) in SHAPES.items():
        col = torch.exp2(torch.rand(c, generator=g) * 4 - 2)
        x = torch.empty(r, c).exponential_(generator=g) * torch.where(torch.rand(r, c, generator=g) < 0.5, -0.02, 0.02)
        tens[k] = (x * col).contiguous()
        scales[k] = channel_scales(np.ones(r), (1.0 / col.double() ** 2).numpy())
    return tens, scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    tens, scales = model(a.seed)
    n = sum(t.numel() for t in tens.values())
    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("plain", {}), ("channel_scales", {"channel_scales": scales})):
            path = Path(tmp) / f"{name}.ggz"
            w_wall, w_cpu, h = best_of(lambda kw=kw, path=path: save_compressed(tens, path, rel_error=0.02, **kw))
            r_wall, r_cpu, back = best_of(lambda path=path: load_compressed(path))
            assert all(back[k].shape == t.shape for k, t in tens.items())
            rows[name] = {"write_s": round(w_wall, 3), "write_cpu_s": round(w_cpu, 3), "load_s": round(r_wall, 3),
                          "load_cpu_s": round(r_cpu, 3), "load_mb_per_s": round(4 * n / r_wall / 1e6, 1),
                          "bits_per_weight": round(8 * h["file_bytes"] / n, 4)}
    ratio = rows["plain"]["load_s"] / rows["channel_scales"]["load_s"]
    result = {"benchmark": "bench_channels", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                          "torch": torch.__version__, "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                          "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
              "weights": n, "seed": a.seed, "runs": rows, "load_speed_ratio": round(ratio, 3),
              "write_time_ratio": round(rows["channel_scales"]["write_s"] / rows["plain"]["write_s"], 3),
              "goal_load_speed_ratio": 0.8, "goal_met": ratio >= 0.8}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
