"""Coder throughput and sizes on MiniLM's quantized weights, against zstd-19 and fp16 safetensors.

    python benchmarks/bench_codec.py [--bits 10] [--repeat 3] [--quick]

Every floating tensor of all-MiniLM-L6-v2 is quantized with its own step (``--bits``, the
paper's FL = 10 reference by default). For each coder (``fl, eg, huffman, ans, ans-hist``) the
same integers are encoded and decoded tensor by tensor as the version-2 .ggz file does
(``ans``/``ans-hist``: the integer rANS table and the numba rANS; the others through
``ggprior.codec.registry``), checked to round-trip exactly, and timed on one thread: best of
``--repeat`` runs, as wall time and as the thread's CPU time (the machine may be shared; CPU
time is what one core delivers). Sizes: bits/weight of the streams plus every byte of side
information (the .ggz file's header included), against the empirical entropy of each tensor's
histogram; the .ggz file size against zstd level 19 of the same integers (int16 and int32,
per tensor) and against the fp16 and fp32 safetensors files. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save

from _timing import best_of
from ggprior.codec import quantizer as quant
from ggprior.codec import rans, registry
from ggprior.codec.container import save_compressed
from ggprior.codec.ggmodel import fit as gg_fit
from ggprior.codec.histogram import histogram
from ggprior.io.sources import floating_names, open_source


def _encode(coder: str, q: np.ndarray, gg) -> tuple[bytes, dict]:
    """What the version-2 file does: ``ans``/``ans-hist`` through the integer rANS table, the rest via the registry."""
    if coder not in ("ans", "ans-hist"):
        return registry.encode(coder, q, gg)
    qmin, freqs = registry.rans_table(coder, histogram(q), gg)
    return rans.encode((q - qmin).astype(np.int32), freqs), {"qmin": qmin, "freqs": freqs}


def _decode(coder: str, data: bytes, n: int, params: dict, gg) -> np.ndarray:
    if coder not in ("ans", "ans-hist"):
        return registry.decode(coder, data, n, params, gg)
    return rans.decode(data, params["freqs"], n) + params["qmin"]


def _zstd_bytes(arrays: list[np.ndarray], dtype: str) -> int:
    c = zstandard.ZstdCompressor(level=19)
    return sum(len(c.compress(np.ascontiguousarray(a, dtype=dtype).tobytes())) for a in arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="12 tensors of at most 1M weights, one repeat (smoke test)")
    args = p.parse_args()
    torch.set_num_threads(1)
    repeat = 1 if args.quick else args.repeat

    src = open_source("minilm")
    names = floating_names(src)
    if args.quick:
        names = [n for n in names if src[n].numel() <= 1 << 20][:12]
    tensors = {n: src[n] for n in names}
    qs, steps, ggs = {}, {}, {}
    for n, t in tensors.items():
        steps[n] = quant.step_for_bits(t, args.bits, name=n)
        qs[n] = quant.quantize(t, steps[n], name=n).numpy().reshape(-1)
        ggs[n] = gg_fit(histogram(qs[n])).as_float32()
    weights = sum(q.size for q in qs.values())
    entropy_bits = sum(histogram(q).entropy_bits() for q in qs.values())

    coders = {}
    for coder in registry.CODERS:
        for n in names[:2]:  # JIT warm-up on small tensors
            _encode(coder, qs[n][:1000], ggs[n])

        def enc(coder=coder):
            return {n: _encode(coder, qs[n], ggs[n]) for n in names}

        w_enc, c_enc, streams = best_of(enc, repeat, time.thread_time)

        def dec(coder=coder, streams=streams):
            return {n: _decode(coder, streams[n][0], qs[n].size, streams[n][1], ggs[n]) for n in names}

        w_dec, c_dec, decoded = best_of(dec, repeat, time.thread_time)
        assert all(np.array_equal(decoded[n], qs[n]) for n in names), coder
        stream_bits = 8 * sum(len(s) for s, _ in streams.values())
        coders[coder] = {
            "encode_M_weights_per_s_cpu": weights / c_enc / 1e6, "decode_M_weights_per_s_cpu": weights / c_dec / 1e6,
            "encode_M_weights_per_s_wall": weights / w_enc / 1e6, "decode_M_weights_per_s_wall": weights / w_dec / 1e6,
            "stream_bits_per_weight": stream_bits / weights,
        }

    sd = {n: tensors[n] for n in names}
    fp16 = len(save({n: t.half().contiguous() for n, t in sd.items()}))
    fp32 = len(save({n: t.float().contiguous() for n, t in sd.items()}))
    zstd16 = _zstd_bytes(list(qs.values()), "<i2") if args.bits <= 16 else None
    zstd32 = _zstd_bytes(list(qs.values()), "<i4")
    with tempfile.TemporaryDirectory() as tmp:
        for coder in registry.CODERS:
            path = Path(tmp) / f"{coder}.ggz"
            t0 = time.perf_counter()
            header = save_compressed(sd, path, coder=coder, bits=args.bits)
            size = os.path.getsize(path)
            c = coders[coder]
            c.update(
                file_bytes=size, file_write_s=time.perf_counter() - t0,
                header_bytes=size - header["data_bytes"],
                file_bits_per_weight=8 * size / weights,
                file_vs_entropy=8 * size / entropy_bits,
                stream_vs_entropy=c["stream_bits_per_weight"] * weights / entropy_bits,
                file_vs_zstd19_int16=size / zstd16 if zstd16 else None, file_vs_zstd19_int32=size / zstd32,
                file_vs_fp16_safetensors=size / fp16, fp16_safetensors_over_file=fp16 / size,
            )
    buf = io.StringIO()
    json.dump({
        "model": "all-MiniLM-L6-v2", "tensors": len(names), "weights": weights, "bits": args.bits,
        "repeat": repeat, "threads": 1, "quick": args.quick,
        "empirical_entropy_bits_per_weight": entropy_bits / weights,
        "zstd19_int16_bytes": zstd16, "zstd19_int32_bytes": zstd32,
        "zstd19_int16_bits_per_weight": 8 * zstd16 / weights if zstd16 else None,
        "fp16_safetensors_bytes": fp16, "fp32_safetensors_bytes": fp32,
        "coders": coders,
    }, buf, indent=1)
    print(buf.getvalue())


if __name__ == "__main__":
    main()
