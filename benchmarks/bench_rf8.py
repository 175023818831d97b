"""RF8 encode/decode throughput and RF8Linear forward latency and weight memory, against baselines in the same run.

    python benchmarks/bench_rf8.py [--n 16777216] [--repeat 5] [--device cpu] [--threads 1]

Prints JSON. Throughput is GB/s of float32 values (4 bytes a value) for encoding and of decoded
float32 output for decoding; baselines: the bit-arithmetic reference encoder, casts to bfloat16 and
FP8 E4M3 (torch), and casts back. Layers: forward latency (median of ``--repeat`` runs, ms) and weight
bytes of RF8Linear against nn.Linear in float32 and bfloat16 at 768x768, 768x3072 and 2048x8192, for a
batch of 1 and of 64 tokens; ``ratio_*`` are RF8Linear's time or memory divided by the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from torch import nn

from ggprior import formats
from ggprior.formats import rf8

SHAPES = ((768, 768), (768, 3072), (2048, 8192))
BATCHES = (1, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up: builds lookup tables, allocator
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(n: int, device: torch.device, repeat: int) -> dict:
    """GB/s of encoders and decoders on ``n`` N(0, 0.05^2) float32 values."""
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.05).to(device)
    codes = rf8.encode(x)
    gb = n * 4 / 1e9
    enc = {
        "rf8_truncate": lambda: rf8.encode(x, "truncate"),
        "rf8_nearest": lambda: rf8.encode(x, "nearest"),
        "rf8_reference_bit_math": lambda: rf8._reference_encode(x, "truncate"),
        "cast_bf16": lambda: x.to(torch.bfloat16),
        "cast_fp8_e4m3": lambda: x.to(torch.float8_e4m3fn),
    }
    bf, f8 = x.to(torch.bfloat16), x.to(torch.float8_e4m3fn)
    dec = {
        "rf8_decode_fp32": lambda: rf8.decode(codes),
        "rf8_decode_bf16": lambda: rf8.decode(codes, torch.bfloat16),
        "cast_bf16_to_fp32": lambda: bf.to(torch.float32),
        "cast_fp8_e4m3_to_fp32": lambda: f8.to(torch.float32),
    }
    out = {"encode_GB_per_s": {k: gb / _median_s(f, device, repeat) for k, f in enc.items()},
           "decode_GB_per_s": {k: gb / _median_s(f, device, repeat) for k, f in dec.items()}}
    e, d = out["encode_GB_per_s"], out["decode_GB_per_s"]
    out["ratio_rf8_encode_vs_fp8_cast"] = e["rf8_truncate"] / e["cast_fp8_e4m3"]
    out["ratio_rf8_lut_vs_bit_math_encode"] = e["rf8_truncate"] / e["rf8_reference_bit_math"]
    out["ratio_rf8_decode_vs_fp8_cast"] = d["rf8_decode_fp32"] / d["cast_fp8_e4m3_to_fp32"]
    return out


def layers(device: torch.device, repeat: int) -> list[dict]:
    """Forward latency and weight memory of RF8Linear vs nn.Linear (fp32, bf16) per shape and batch."""
    rows = []
    for d_in, d_out in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out, bias=False).to(device)
        lin16 = nn.Linear(d_in, d_out, bias=False).to(device, torch.bfloat16)
        lin16.weight.data.copy_(lin.weight.data)
        q = formats.RF8Linear.from_linear(lin)
        mem = {"fp32": lin.weight.nbytes, "bf16": lin16.weight.nbytes, "rf8": q.weight_codes.nbytes}
        for batch in BATCHES:
            x = torch.randn(batch, d_in, device=device)
            x16 = x.to(torch.bfloat16)
            with torch.no_grad():
                calls = {"fp32": partial(lin, x), "bf16": partial(lin16, x16), "rf8": partial(q, x),
                         "rf8_bf16_input": partial(q, x16)}
                t = {k: _median_s(f, device, repeat) for k, f in calls.items()}
            rows.append({
                "shape": f"{d_in}x{d_out}", "batch": batch,
                **{f"ms_{k}": 1e3 * v for k, v in t.items()},
                "ratio_time_rf8_vs_fp32": t["rf8"] / t["fp32"], "ratio_time_rf8_vs_bf16": t["rf8_bf16_input"] / t["bf16"],
                **{f"weight_bytes_{k}": v for k, v in mem.items()},
                "ratio_memory_rf8_vs_fp32": mem["rf8"] / mem["fp32"], "ratio_memory_rf8_vs_bf16": mem["rf8"] / mem["bf16"],
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1 << 24, help="values for the throughput figures")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(json.dumps({
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "n": args.n, "repeat": args.repeat, "torch": torch.__version__,
        "throughput": throughput(args.n, device, args.repeat), "layers": layers(device, args.repeat),
    }, indent=1))


if __name__ == "__main__":
    main()
