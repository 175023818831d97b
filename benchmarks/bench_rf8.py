"""RF8 encode/decode throughput, and the forward latency of the 8-bit layers against fp32 nn.Linear in the same run.

    flock /tmp/ggprior-heavy.lock python benchmarks/bench_rf8.py --out docs/results/benchmarks/bench_rf8.json
    python benchmarks/bench_rf8.py [--n 16777216] [--repeat 7] [--device cpu] [--threads 1] [--out FILE]

Prints (and with ``--out`` writes) JSON. Throughput is GB/s of float32 values (4 bytes a value)
for encoding and of decoded float32 output for decoding; baselines: the bit-arithmetic reference
encoder, casts to bfloat16 and FP8 E4M3 (torch), and casts back.

Layers (issue 15): per shape ``d_in x d_out`` and batch 1 / 8 / 32, under ``torch.no_grad``, the time
of one forward of ``nn.Linear`` in float32 (the baseline), of ``RF8Linear`` (the fused path, weight
held as 1-byte codes), of ``RF8Linear.reference_forward`` (decode-then-matmul, the path before the
fused kernels), of ``QuantLinear`` in int8 and fp8-e4m3-scaled (the same kernel), of a plain
``nn.Linear`` holding the RF8 ``QuantWeight`` Parameter (``rf8_plain_linear``: ``F.linear`` reaches the
same kernel through ``QuantWeight.__torch_function__``), and, where the CPU
has AVX-512 VBMI (``kernel``: ``vbmi``), of ``RF8Linear`` on the portable numba kernels
(``rf8_numba``, what a CPU without VBMI runs). Each figure is
the median over ``--repeat`` samples of the wall time and the process CPU time per call (a sample
runs the call enough times to last ~2 ms); ``ratio_cpu_*`` / ``ratio_wall_*`` divide by the fp32
baseline's. Goal: ``ratio_cpu_rf8`` <= 1.5 at batch 1 and <= 1.2 at batch 32. torch and numba run
on ``--threads`` threads (:func:`ggprior.threads.configure_threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial

import torch
from torch import nn

from ggprior import formats
from ggprior.formats import lut_kernels, rf8
from ggprior.threads import configure_threads

SHAPES = ((384, 384), (1536, 384), (384, 1536), (768, 3072), (2048, 2048))  # d_in x d_out
BATCHES = (1, 8, 32)
SAMPLE_S = 2e-3


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


def _per_call(fn, repeat: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of one call of ``fn``."""
    fn()
    t = time.perf_counter()
    fn()
    calls = max(1, int(SAMPLE_S / max(time.perf_counter() - t, 1e-7)))
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        cpus.append((time.process_time() - c) / calls)
        walls.append((time.perf_counter() - w) / calls)
    return statistics.median(walls), statistics.median(cpus)


def layers(repeat: int) -> list[dict]:
    """Forward latency of the 8-bit layers vs nn.Linear in float32, per shape and batch (CPU)."""
    rows = []
    for d_in, d_out in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out)
        nn.init.normal_(lin.weight, std=d_in ** -0.5)
        q = formats.RF8Linear.from_linear(lin)
        others = {f: formats.QuantLinear.from_linear(lin, f) for f in ("int8", "fp8-e4m3-scaled")}
        plain = nn.Linear(d_in, d_out)
        plain.weight, plain.bias = q.weight, q.bias  # the subclass in an unconverted layer
        for batch in BATCHES:
            x = torch.randn(batch, d_in)
            calls = {"fp32": partial(lin, x), "rf8": partial(q, x), "rf8_reference": partial(q.reference_forward, x),
                     "rf8_plain_linear": partial(plain, x),
                     **{f: partial(m, x) for f, m in others.items()}}
            with torch.no_grad():
                err = float((q(x) - q.reference_forward(x)).abs().max())
                t = {k: _per_call(f, repeat) for k, f in calls.items()}
                vbmi = lut_kernels.use_vbmi()
                if vbmi:  # the portable numba kernels too, as on a CPU without AVX-512 VBMI
                    lut_kernels.use_vbmi(False)
                    t["rf8_numba"] = _per_call(calls["rf8"], repeat)
                    lut_kernels.use_vbmi(True)
            rows.append({
                "shape": f"{d_in}x{d_out}", "batch": batch, "kernel": "vbmi" if vbmi else "numba",
                **{f"us_wall_{k}": 1e6 * w for k, (w, _) in t.items()},
                **{f"us_cpu_{k}": 1e6 * c for k, (_, c) in t.items()},
                **{f"ratio_cpu_{k}": c / t["fp32"][1] for k, (_, c) in t.items() if k != "fp32"},
                **{f"ratio_wall_{k}": w / t["fp32"][0] for k, (w, _) in t.items() if k != "fp32"},
                "max_abs_diff_rf8_fused_vs_reference": err,
                "weight_bytes_fp32": lin.weight.nbytes, "weight_bytes_rf8": q.weight_codes.nbytes,
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1 << 24, help="values for the throughput figures")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cpu", help="device of the throughput figures (the layers run on CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    threads = configure_threads(args.threads)
    device = torch.device(args.device)
    load0, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads, "n": args.n, "repeat": args.repeat, "torch": torch.__version__,
        "load_avg_1min_start": load0,
        "throughput": throughput(args.n, device, args.repeat), "layers": layers(args.repeat),
    }
    result.update(load_avg_1min_end=os.getloadavg()[0], total_cpu_s=time.process_time() - cpu0,
                  total_wall_s=time.perf_counter() - wall0)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
