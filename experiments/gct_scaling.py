"""GCT at 2 and 4 workers (measured on gloo) and a byte / bandwidth model to 64 and 1024 workers.

    python experiments/gct_scaling.py --out docs/results/gct_scaling           # measure + model
    python experiments/gct_scaling.py --out docs/results/gct_scaling --model-only   # redo the model from scaling.json

Measured: the small BERT on spam (``ggprior.gct.train``), one run per world size and
method: fp32 allreduce, fp16, PowerSGD (rank 2), GCT with the all_gather exchange and with the
reduce-scatter exchange. Per worker and step: coded payload bytes, wire bytes (the bytes the
worker puts on the links: padded all_gather blocks forwarded on a ring, its all_to_all chunks),
test accuracy of worker 0, seconds per step. Then the coders' throughput on GG(gamma 0.3) values.

Model (assumptions in README.md): bytes per worker and step for a P-value gradient in B buckets,
and the communication + coding time per step on 1, 10 and 100 Gb/s links.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ggprior import gg  # noqa: E402
from ggprior.gct import GCTConfig, codec  # noqa: E402
from ggprior.gct.train import DPConfig, data_parallel  # noqa: E402
from ggprior.train import TrainConfig  # noqa: E402

METHODS = {"allreduce": ("allreduce", None), "fp16": ("fp16", None), "powersgd": ("powersgd", None),
           "gct-allgather": ("gct", "allgather"), "gct-reduce_scatter": ("gct", "reduce_scatter")}
WORLDS_MODEL = (2, 4, 8, 16, 64, 256, 1024)
LINKS_GBPS = (1, 10, 100)
ALPHA_S = 50e-6  # per message latency on a TCP link (assumption)


def measure(worlds: list[int], max_train: int, epochs: int) -> list[dict]:
    rows = []
    for world in worlds:
        for name, (method, exchange) in METHODS.items():
            cfg = DPConfig(method=method, task="spam", max_len=32, max_train=max_train, max_eval=256, timeout=120,
                           gct=GCTConfig(exchange=exchange or "auto"), powersgd_start=2,
                           train=TrainConfig(epochs=epochs, batch_size=16, progress=False))
            t0 = time.perf_counter()
            res = data_parallel(cfg, world, deadline=1800, start_method="fork")
            wall = time.perf_counter() - t0
            assert len({r["params_checksum"] for r in res}) == 1
            comm = [r["comm"] for r in res]
            row = {"world": world, "method": name, "steps": res[0]["steps"], "values": res[0]["values_per_step"],
                   "accuracy": res[0]["metrics"]["test"]["accuracy"],
                   "payload_bytes_per_step": float(np.mean([c["bytes_per_step"] for c in comm])),
                   "stage2_bytes_per_step": float(np.mean([c.get("stage2_bytes_per_step", 0.0) for c in comm])),
                   "wire_bytes_per_step": float(np.mean([c["wire_bytes_per_step"] for c in comm])),
                   "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in res])), "wall_s": wall}
            if method == "allreduce" or method == "fp16" or method == "powersgd":
                row["wire_bytes_per_step"] = 2 * (world - 1) / world * row["payload_bytes_per_step"]  # ring allreduce
            row["raw_buckets"] = sum(c.get("raw_buckets", 0) for c in comm)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def coder_speed(n: int = 1_000_000) -> dict:
    torch.set_num_threads(1)
    g = gg.sample((n,), 0.0, 1e-4, 0.3, generator=torch.Generator().manual_seed(0))
    step = 0.05 * float(g.square().mean().sqrt())
    codec.warmup()
    out = {}
    for coder in codec.CODERS:
        t0 = time.process_time()
        q = codec.rate_quantize(g, step).numpy()
        frame = codec.encode_frame(q, step, coder)
        t1 = time.process_time()
        codec.decode_frame(frame)
        t2 = time.process_time()
        out[coder] = {"encode_s_per_value": (t1 - t0) / n, "decode_s_per_value": (t2 - t1) / n,
                      "bits_per_value": 8 * len(frame) / n}
    return out


def _powersgd_fraction(rank: int) -> float:
    """Values PowerSGD (rank ``rank``, torch's rule: compress a matrix when that sends fewer values) sends for the
    small BERT, as a fraction of its gradient values (used when no measured run got past PowerSGD's warm-up)."""
    from ggprior.tasks import build_model, get_tokenizer

    tok = get_tokenizer("bpe", "spam", 4096)
    m = build_model("bert", "classification", vocab_size=tok.vocab_size, max_positions=32, pad_id=tok.pad_id)
    sent = total = 0
    for p in m.parameters():
        total += p.numel()
        n = p.shape[0] if p.dim() else 1
        k = p.numel() // max(n, 1)
        r = min(n, k, rank)
        sent += (n + k) * r if p.dim() >= 2 and (n + k) * r < n * k else p.numel()
    return sent / total


def byte_model(world: int, values: float, buckets: int, bits: dict, psgd_frac: float, frame_overhead: float) -> dict:
    """Bytes one worker sends per step (see README.md for the assumptions)."""
    ring = 2 * (world - 1) / world
    c1, c2 = bits["gct1"] / 8, bits["gct2"] / 8
    h = frame_overhead
    return {
        "allreduce": ring * 4 * values,
        "fp16": ring * 2 * values,
        "powersgd": ring * 4 * values * psgd_frac,
        "gct-allgather": (world - 1) * (c1 * values + h * buckets),
        "gct-reduce_scatter": (world - 1) / world * (c1 + c2) * values + 2 * (world - 1) * h * buckets,
    }


def time_model(world: int, values: float, buckets: int, nbytes: dict, speed: dict, gbps: float) -> dict:
    """Seconds per step of communication (+ coding for GCT, not overlapped: worst case)."""
    bw = gbps * 1e9 / 8
    enc, dec = speed["encode_s_per_value"], speed["decode_s_per_value"]
    msgs = {"allreduce": 2 * (world - 1), "fp16": 2 * (world - 1), "powersgd": 4 * (world - 1),
            "gct-allgather": 2 * (world - 1), "gct-reduce_scatter": 4 * (world - 1)}
    code = {"allreduce": 0.0, "fp16": 0.0, "powersgd": 0.0,
            "gct-allgather": values * (enc + world * dec),
            "gct-reduce_scatter": values * (enc + dec) + values / world * enc + values * dec}
    return {m: nbytes[m] / bw + msgs[m] * buckets * ALPHA_S + code[m] for m in nbytes}


def model(measured: list[dict], speed: dict) -> dict:
    by = {(r["world"], r["method"]): r for r in measured}
    w0 = min(r["world"] for r in measured)
    n = by[(w0, "allreduce")]["values"]
    # bits per value of GCT's two stages, measured at the largest world of the reduce-scatter runs: stage 1 = its
    # W chunks (the whole bucket once), stage 2 = its own shard's frame (1/W of the bucket)
    rs = max((r for r in measured if r["method"] == "gct-reduce_scatter"), key=lambda r: r["world"])
    c1 = 8 * (rs["payload_bytes_per_step"] - rs["stage2_bytes_per_step"]) / n
    c2 = rs["world"] * 8 * rs["stage2_bytes_per_step"] / n
    # PowerSGD runs plain allreduce for its first 2 steps (powersgd_start=2): take them out
    psgd = [r for r in measured if r["method"] == "powersgd" and r["steps"] > 2]
    psgd_frac = min((r["payload_bytes_per_step"] * r["steps"] - 2 * 4 * n) / (r["steps"] - 2) for r in psgd) / (4 * n) \
        if psgd else _powersgd_fraction(rank=2)
    bits = {"gct1": c1, "gct2": c2}
    frame_overhead = 60.0  # header (14 B) + rANS count table (tens of bytes) per frame; assumption
    out = {"assumptions": {"alpha_s": ALPHA_S, "frame_overhead_bytes": frame_overhead, "bits_per_value": bits,
                           "powersgd_fraction_of_fp32": psgd_frac, "coder_speed": speed},
           "models": {}}
    for label, values, buckets in (("small BERT (measured model)", n, 1), ("BERT-base size, 110M values", 110e6, 18)):
        rows = []
        for world in WORLDS_MODEL:
            nb = byte_model(world, values, buckets, bits, psgd_frac, frame_overhead)
            times = {f"{g}Gbps": time_model(world, values, buckets, nb, speed["ans"], g) for g in LINKS_GBPS}
            rows.append({"world": world, "bytes": nb, "seconds": times})
        out["models"][label] = {"values": values, "buckets": buckets, "rows": rows}
    return out


def plot(res: dict, out: Path) -> None:
    label = "BERT-base size, 110M values"
    m = res["model"]["models"][label]
    worlds = [r["world"] for r in m["rows"]]
    fig, axes = plt.subplots(1, 1 + len(LINKS_GBPS), figsize=(18, 4))
    for meth in m["rows"][0]["bytes"]:
        axes[0].plot(worlds, [r["bytes"][meth] / 1e6 for r in m["rows"]], marker="o", label=meth)
    for r in res["measured"]:
        axes[0].scatter([r["world"]], [r["wire_bytes_per_step"] * 110e6 / r["values"] / 1e6], marker="x", color="k", s=12)
    axes[0].set(xscale="log", yscale="log", xlabel="workers", ylabel="MB sent per worker per step",
                title=f"bytes per worker ({label}); x: measured, scaled")
    axes[0].legend(fontsize=7)
    for ax, g in zip(axes[1:], LINKS_GBPS, strict=True):
        for meth in m["rows"][0]["bytes"]:
            ax.plot(worlds, [r["seconds"][f"{g}Gbps"][meth] for r in m["rows"]], marker="o", label=meth)
        ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="s per step (comm + coding)", title=f"{g} Gb/s")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def _mb(x: float) -> str:
    return f"{x / 1e6:.3g}"


def write_readme(res: dict, out: Path) -> None:
    a = res["model"]["assumptions"]
    lines = ["# GCT at 2 and 4 workers, and a byte / bandwidth model to 1024", "",
             f"Command: `{res['command']}` (2 CPU cores, "
             f"load average {res.get('load_average_1min', float('nan')):.1f} when it finished). Data: `scaling.json`; "
             "plot: `scaling.png`. Design and formulas: [docs/gct.md](../../gct.md).", "",
             "## Measured (gloo, CPU processes on one machine; small BERT on spam, "
             f"{res['measured'][0]['values']:,} gradient values)", "",
             "| workers | method | steps | test accuracy | coded payload B/step | wire B/step per worker | vs fp32 wire | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["world"]: r for r in res["measured"] if r["method"] == "allreduce"}
    mod = next(iter(res["model"]["models"].values()))
    pred = {row["world"]: row["bytes"] for row in mod["rows"]}
    lines[-2] = lines[-2] + " model B/step |"
    lines[-1] = lines[-1] + "---|"
    for r in res["measured"]:
        p = pred.get(r["world"], {}).get(r["method"])
        lines.append(f"| {r['world']} | {r['method']} | {r['steps']} | {r['accuracy']:.3f} | "
                     f"{r['payload_bytes_per_step']:,.0f} | {r['wire_bytes_per_step']:,.0f} | "
                     f"{r['wire_bytes_per_step'] / base[r['world']]['wire_bytes_per_step']:.3f} | "
                     f"{r['seconds_per_step']:.3f} | {'' if p is None else f'{p:,.0f}'} |")
    lines += ["", "Wire bytes: what one worker puts on the links per step (ring allreduce 2(W-1)/W x payload for "
              "fp32, fp16 and PowerSGD; for GCT the padded all_gather blocks it forwards on a ring, its all_to_all "
              "chunks to the others and the length headers). Accuracy after a short run (one seed); it says the "
              "exchanges train, not which is best.", "",
              "## Model", "",
              f"Assumptions: bits per value of GCT's stages measured above (stage 1 {a['bits_per_value']['gct1']:.2f}, "
              f"stage 2 {a['bits_per_value']['gct2']:.2f}; taken as independent of W); PowerSGD sends "
              f"{a['powersgd_fraction_of_fp32']:.3f} of fp32's values (measured, rank 2); {a['frame_overhead_bytes']:.0f} "
              f"bytes of header and count table per frame; {a['alpha_s'] * 1e6:.0f} us per message; ring collectives; "
              "no padding (the measured GCT wire bytes include gloo's all_gather padding to the largest frame, "
              "which is large when shards differ in sparsity, e.g. an embedding's mostly-zero gradient in one shard); "
              "coding time from this CPU (rANS: encode "
              f"{a['coder_speed']['ans']['encode_s_per_value'] * 1e9:.1f} ns/value, decode "
              f"{a['coder_speed']['ans']['decode_s_per_value'] * 1e9:.1f} ns/value, one core), added in full (no overlap "
              "with the backward pass: the worst case for GCT). Links: every worker has its own link of the given "
              "speed.", ""]
    for label, m in res["model"]["models"].items():
        meths = list(m["rows"][0]["bytes"])
        lines += [f"### {label} ({m['buckets']} bucket(s))", "", "MB sent per worker per step:", "",
                  "| workers | " + " | ".join(meths) + " |", "|---" * (len(meths) + 1) + "|"]
        for r in m["rows"]:
            lines.append(f"| {r['world']} | " + " | ".join(_mb(r["bytes"][k]) for k in meths) + " |")
        for g in LINKS_GBPS:
            lines += ["", f"Seconds per step of communication (+ coding) at {g} Gb/s; the fastest in bold:", "",
                      "| workers | " + " | ".join(meths) + " |", "|---" * (len(meths) + 1) + "|"]
            for r in m["rows"]:
                t = r["seconds"][f"{g}Gbps"]
                best = min(t, key=t.get)
                lines.append(f"| {r['world']} | " + " | ".join(
                    (f"**{t[k]:.3g}**" if k == best else f"{t[k]:.3g}") for k in meths) + " |")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/gct_scaling")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-train", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    if args.model_only:
        res = json.loads(path.read_text())
    else:
        res = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "measured": measure(
            args.worlds, args.max_train, args.epochs), "coders": coder_speed()}
    res["model"] = model(res["measured"], res["coders"])
    res.setdefault("load_average_1min", __import__("os").getloadavg()[0])
    path.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out)
    write_readme(res, out)
    print(json.dumps(res["model"]["assumptions"], indent=1))


if __name__ == "__main__":
    main()
