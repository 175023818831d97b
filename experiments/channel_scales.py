"""Channel scales' clamps: how far a row's or column's step may move from its tensor's, measured on SmolLM2 and MiniLM.

    python experiments/channel_scales.py                 # both models, about 20 min on 2 idle cores
    python experiments/channel_scales.py --models minilm # one
    python experiments/channel_scales.py --models smollm2 --lm-calib 64 --clamps none,2:0.5 \
        --out docs/results/channel_scales/calib16384     # 16384 calibration tokens instead of 4096

For each model: the Fisher's row and column means of every matrix (``sensitivity_weights(kind="fisher",
per_channel=True)``; SmolLM2 on 16 blocks of 256 bbc-lm train tokens, MiniLM on its 4 calibration pairs as in
rate_distortion.py), then ``.ggz`` files written by ``save_compressed(target_bits=B, weights=, channel_scales=)``
(scalar quantizer, the allocation weighted by the Fisher) with the scales' clamps ``finer:coarser`` in octaves
(``none``: no scales), read back and measured: SmolLM2 by the KL of its next-token distribution from the original
(nats/token, 8192 bbc-lm test tokens), MiniLM by 1 - the mean cosine of its sentence embeddings to the original's.
Seeds: torch 0, the Fisher's label draws seed 0. Writes docs/results/channel_scales/{README.md, channel_scales.json,
channel_scales.png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rate_distortion as RD  # noqa: E402
from ggprior.codec.channels import scaled_weights  # noqa: E402
from ggprior.codec.sensitivity import sensitivity_weights  # noqa: E402

CLAMPS = ("none", "1:1", "2:0.5", "2:1", "3:1", "1:0.5", "4:4")
TARGETS = (4.0, 6.0)
DEFAULT = "2:0.5"


def _quality(model_name: str, quality, m) -> float:
    q = quality(m)
    return q["kl"] if model_name == "smollm2" else 1.0 - q


def run(model_name: str, clamps: tuple[str, ...], targets: tuple[float, ...], log=print, lm_calib: int = 16) -> dict:
    torch.manual_seed(0)
    p = dict(RD.FULL, lm_tokens=8192, lm_calib=lm_calib)
    if model_name == "smollm2":
        model, quality, calib, loss_fn = RD.smollm2(p)
        kw = {"kind": "fisher"}
    else:
        model, quality, calib, loss_fn = RD.minilm(p)
        kw = {"loss_fn": loss_fn}
    tens = RD.matrices(model, None)
    fisher = sensitivity_weights(model, calib, names=tens, per_channel=True, **kw)
    weights = {k: float(f[0].mean()) for k, f in fisher.items()}
    rows = []
    for b in targets:
        for c in clamps:
            t0 = time.time()
            if c == "none":
                w, scales = weights, None
            else:
                finer, coarser = (float(x) for x in c.split(":"))
                w, scales = scaled_weights(weights, fisher, finer=finer, coarser=coarser)
            recon, bits = RD.m_file_alloc(tens, b, w, trellis=False, scales=scales)
            m2 = copy.deepcopy(model)
            sd = m2.state_dict()
            for k, r in recon.items():
                sd[k].copy_(r.to(sd[k].dtype))
            n = sum(t.numel() for t in tens.values())
            row = {"model": model_name, "target": b, "clamps": c, "bits": sum(bits.values()) / n,
                   "distortion": _quality(model_name, quality, m2), "seconds": time.time() - t0}
            rows.append(row)
            log(f"{model_name} B={b} clamps={c}: {row['bits']:.3f} bits, distortion {row['distortion']:.5g} "
                f"({row['seconds']:.0f} s)")
    return {"model": model_name, "rows": rows,
            "measure": "KL nats/token" if model_name == "smollm2" else "1 - mean cosine"}


def plot(results: list[dict], path: Path) -> None:
    from ggprior.report.plots import plt, save_figure

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        clamps = list(dict.fromkeys(x["clamps"] for x in r["rows"]))
        for b in sorted({x["target"] for x in r["rows"]}):
            base = next(x["distortion"] for x in r["rows"] if x["target"] == b and x["clamps"] == "none")
            ys = [next(x["distortion"] for x in r["rows"] if x["target"] == b and x["clamps"] == c) / base
                  for c in clamps]
            ax.plot(range(len(clamps)), ys, "o-", label=f"{b:g} bits/weight")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(clamps)), clamps)
        ax.set_xlabel("clamps finer:coarser (octaves)")
        ax.set_ylabel(f"{r['measure']} / without scales (log)")
        ax.set_title(r["model"])
        ax.legend()
    save_figure(fig, path)


def readme(results: list[dict], command: str) -> str:
    out = ["# Channel scales: how far a channel's step may move", "",
           "Each matrix's step shaped per row and column by the Fisher's row and column means "
           "(`ggprior.codec.channels`), clamped `finer` octaves below and `coarser` above the tensor's geometric "
           "mean step; `none` is the per-tensor allocation alone. Same Fisher-weighted allocation, same size "
           "(the scales' bytes counted), real `.ggz` files read back. Lower is better.", "",
           f"Command: `{command}` (torch seed 0, Fisher draws seed 0).", "", "![clamps](channel_scales.png)", ""]
    for r in results:
        out += [f"## {r['model']} ({r['measure']})", "", "| clamps | " + " | ".join(
            f"{b:g} bits: bits | {b:g} bits: {r['measure']} | ratio to none" for b in sorted({x['target'] for x in r['rows']})) + " |",
            "|---|" + "---|---|---|" * len({x["target"] for x in r["rows"]})]
        for c in dict.fromkeys(x["clamps"] for x in r["rows"]):
            cells = []
            for b in sorted({x["target"] for x in r["rows"]}):
                x = next(x for x in r["rows"] if x["target"] == b and x["clamps"] == c)
                base = next(y for y in r["rows"] if y["target"] == b and y["clamps"] == "none")
                cells.append(f"{x['bits']:.3f} | {x['distortion']:.3g} | {x['distortion'] / base['distortion']:.2f}")
            out.append(f"| {c}{' (default)' if c == DEFAULT else ''} | " + " | ".join(cells) + " |")
        out.append("")
        for b in sorted({x["target"] for x in r["rows"]}):
            rows = [x for x in r["rows"] if x["target"] == b]
            base = next(x["distortion"] for x in rows if x["clamps"] == "none")
            best = min(rows, key=lambda x: x["distortion"])
            out.append(f"* {r['model']} at {b:g} bits/weight: the least {r['measure']} with clamps {best['clamps']} "
                       f"({best['distortion'] / base:.2f}x without scales); the most with "
                       f"{max(rows, key=lambda x: x['distortion'])['clamps']} "
                       f"({max(x['distortion'] for x in rows) / base:.2f}x).")
        out.append("")
    out += ["The Fisher is a local model of small, independent errors; a channel quantized far coarser than the "
            "rest is a large, coherent one, which it underprices. The library's clamps are the default row.", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--out", type=Path, default=RD.REPO / "docs" / "results" / "channel_scales")
    ap.add_argument("--clamps", default=",".join(CLAMPS), help="comma-separated finer:coarser octaves, or none")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="bits/weight")
    ap.add_argument("--lm-calib", type=int, default=16, help="SmolLM2 calibration blocks of 256 tokens")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md and the plot from the JSON")
    a = ap.parse_args()
    if a.report_only:
        d = json.loads((a.out / "channel_scales.json").read_text())
        plot(d["results"], a.out / "channel_scales.png")
        (a.out / "README.md").write_text(readme(d["results"], d["command"]))
        return
    results = [run(m, tuple(a.clamps.split(",")), tuple(float(x) for x in a.targets.split(",")), lm_calib=a.lm_calib)
               for m in a.models.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    command = RD.command_line("experiments/channel_scales.py")
    (a.out / "channel_scales.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    plot(results, a.out / "channel_scales.png")
    (a.out / "README.md").write_text(readme(results, command))


if __name__ == "__main__":
    main()
