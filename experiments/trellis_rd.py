"""Trellis (dependent) quantization against uniform scalar quantization, at equal MSE, and both against the bound.

    python experiments/trellis_rd.py [--quick] [--out docs/results/rate_distortion] [--smollm2-layers 0,15,29]

Tensors: synthetic GG (gamma 0.5 / 1 / 1.5 / 2, 1M values each, seed 0) and the 2-D matrices of
the built-in all-MiniLM-L6-v2 (as in experiments/rate_distortion.py); with ``--smollm2-layers 0,15,29`` also the
matrices of those decoder layers of SmolLM2-135M. For each tensor and each target
rate (3, 4, 5, 6, 8 bits/weight): the scalar step ``s_b`` whose GG-model entropy is ``b``
(``gg_rd``), scalar quantization on a grid of steps around it (real size: rANS under the fitted GG
plus the step, ``allocate.real_bits``, as ``ggprior compress`` codes it), and trellis quantization
(``codec.trellis``, 4 and 8 states) at step ``s_b / 2`` (real size: every byte of its payload, per-state
tables included). Equal MSE: the scalar curve's bits at the trellis point's MSE (linear in log MSE).
Distance to the bound: bits minus the Shannon lower bound of the fitted GG at that MSE (``gg_rd``).
First, ``lam_c`` (lambda = lam_c * step^2) is swept on the synthetic tensors. Writes trellis.json,
trellis.md and trellis.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ggprior.gg
from ggprior.codec import allocate as A
from ggprior.codec import gg_rd
from ggprior.codec import trellis as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

GAMMAS = (0.5, 1.0, 1.5, 2.0)
FULL = {"n": 1 << 20, "rates": (3.0, 4.0, 5.0, 6.0, 8.0), "lam_cs": (0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
        "tune_rates": (3.0, 4.0, 6.0), "minilm_max": None}
QUICK = {"n": 1 << 16, "rates": (4.0, 6.0), "lam_cs": (0.3, 0.5), "tune_rates": (4.0,), "minilm_max": 3}
STATES = (4, 8)
GROUPS = ("synthetic", "minilm", "smollm2")


def scalar_step(beta: float, gamma: float, bits: float) -> float:
    """The step whose GG-model entropy is ``bits`` (interpolated on gg_rd's table)."""
    H, _ = gg_rd.gg_rd(gamma)
    order = np.argsort(H)
    return beta * 2.0 ** float(np.interp(bits, H[order], gg_rd.GRID_LOG2[order]))


def scalar_curve(w: torch.Tensor, steps: list[float]) -> list[dict]:
    x = w.reshape(-1).double()
    out = []
    for s in sorted(steps):
        s32 = float(np.float32(s))
        mse = float(((x - torch.round(x / s32) * s32) ** 2).mean())
        out.append({"step": s32, "mse": mse, "bits": A.real_bits(w, s32) / x.numel()})
    return out


def bits_at_mse(curve: list[dict], mse: float) -> float:
    pts = sorted(curve, key=lambda r: r["mse"])
    lm = [math.log(r["mse"]) for r in pts]
    if not lm[0] <= math.log(mse) <= lm[-1]:
        return math.nan
    return float(np.interp(math.log(mse), lm, [r["bits"] for r in pts]))


def trellis_point(w: torch.Tensor, step: float, n_states: int, lam_c: float) -> dict:
    x = w.reshape(-1).double().numpy()
    t0 = time.time()
    dq = T.quantize(x, step, n_states=n_states, lam_c=lam_c)
    t1 = time.time()
    payload = T.encode(dq)
    mse = float(((x - dq.values()) ** 2).mean())
    return {"states": n_states, "lam_c": lam_c, "step": dq.step, "mse": mse, "bits": 8 * len(payload) / x.size,
            "ideal_bits": T.ideal_bits(dq) / x.size, "quantize_s": t1 - t0}


def measure(name: str, w: torch.Tensor, rates, lam_cs=(T.LAMBDA_C,), states=STATES) -> dict:
    """Scalar curve and trellis points of one tensor, with equal-MSE gains and distances to the bound."""
    f = ggprior.gg.fit(w.reshape(-1).float(), name=name)
    s_b = {b: scalar_step(f.beta, f.gamma, b) for b in rates}
    lo, hi = math.log2(min(s_b.values())) - 1.0, math.log2(max(s_b.values())) + 0.75
    curve = scalar_curve(w, [2.0 ** e for e in np.arange(lo, hi + 1e-9, 0.25)])
    pts = []
    for b in rates:
        for ns in states:
            for c in lam_cs:
                p = trellis_point(w, s_b[b] / 2, ns, c)
                slb = gg_rd.shannon_lower_bound(f.beta, f.gamma, p["mse"])
                sb = bits_at_mse(curve, p["mse"])
                p.update(target=b, sqnr_db=10 * math.log10(float(w.double().pow(2).mean()) / p["mse"]), slb_bits=slb,
                         scalar_bits=sb, gain_bits=sb - p["bits"], gap_bits=p["bits"] - slb, scalar_gap_bits=sb - slb)
                pts.append(p)
    for r in curve:
        r["gap_bits"] = r["bits"] - gg_rd.shannon_lower_bound(f.beta, f.gamma, r["mse"])
    return {"tensor": name, "n": w.numel(), "beta": f.beta, "gamma": f.gamma, "scalar": curve, "trellis": pts}


def synthetic(n: int) -> dict[str, torch.Tensor]:
    return {f"gg_gamma{g}": ggprior.gg.sample((n,), beta=0.02, gamma=g, generator=torch.Generator().manual_seed(0))
            for g in GAMMAS}


def minilm_matrices(limit: int | None) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    from ggprior.io.sources import builtin_model_dir
    from rate_distortion import matrices

    return matrices(AutoModel.from_pretrained(str(builtin_model_dir("minilm"))), limit)


def smollm2_matrices(layers: list[int]) -> dict[str, torch.Tensor]:
    """The matrices of SmolLM2-135M's decoder ``layers`` (7 each: q, k, v, o, gate, up, down)."""
    from formats_study import load_smollm2
    from rate_distortion import matrices

    model, _ = load_smollm2()
    return {k: v for k, v in matrices(model, None).items() if any(f"layers.{i}." in k for i in layers)}


def summarize(rows: list[dict], group: str) -> list[dict]:
    """Median gain / distances over tensors, per (states, target rate), and the weight-summed bits."""
    out = []
    keys = sorted({(p["states"], p["target"]) for r in rows for p in r["trellis"]})
    for ns, b in keys:
        ps = [(r, p) for r in rows for p in r["trellis"] if p["states"] == ns and p["target"] == b]
        n = sum(r["n"] for r, _ in ps)
        out.append({"group": group, "states": ns, "target": b, "tensors": len(ps),
                    "bits": sum(p["bits"] * r["n"] for r, p in ps) / n,
                    "scalar_bits": sum(p["scalar_bits"] * r["n"] for r, p in ps) / n,
                    "median_gain_bits": float(np.nanmedian([p["gain_bits"] for _, p in ps])),
                    "median_gap_bits": float(np.median([p["gap_bits"] for _, p in ps])),
                    "max_gap_bits": float(np.max([p["gap_bits"] for _, p in ps])),
                    "median_scalar_gap_bits": float(np.nanmedian([p["scalar_gap_bits"] for _, p in ps])),
                    "median_sqnr_db": float(np.median([p["sqnr_db"] for _, p in ps])),
                    "median_overhead_bits": float(np.median([p["bits"] - p["ideal_bits"] for _, p in ps]))})
    return out


def tune(p: dict, syn: dict[str, torch.Tensor]) -> list[dict]:
    """Mean equal-MSE gain over the synthetic tensors and tuning rates, per (states, lam_c)."""
    rows = [measure(k, w, p["tune_rates"], p["lam_cs"]) for k, w in syn.items()]
    out = []
    for ns in STATES:
        for c in p["lam_cs"]:
            g = [q["gain_bits"] for r in rows for q in r["trellis"] if q["states"] == ns and q["lam_c"] == c]
            d = [q["gap_bits"] for r in rows for q in r["trellis"] if q["states"] == ns and q["lam_c"] == c]
            out.append({"states": ns, "lam_c": c, "mean_gain_bits": float(np.nanmean(g)),
                        "mean_gap_bits": float(np.mean(d))})
    return out


def plot(res: dict, path: Path) -> Path:
    from ggprior.report.plots import plt, save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(res["synthetic"] + res["minilm"][:1]):
        c = f"C{i}"
        a1.plot([q["bits"] for q in r["scalar"]], [10 * math.log10(r["beta"] ** 2 / q["mse"]) for q in r["scalar"]],
                color=c, ls=":", lw=1)
        t4 = sorted((q for q in r["trellis"] if q["states"] == 4), key=lambda q: q["bits"])
        a1.plot([q["bits"] for q in t4], [10 * math.log10(r["beta"] ** 2 / q["mse"]) for q in t4], color=c, marker="o",
                lw=1, label=f"{r['tensor']} (gamma {r['gamma']:.2f})")
    a1.set_xlabel("bits / weight (real coded size)")
    a1.set_ylabel("SNR vs beta^2 (dB); dotted: scalar, dots: trellis-4")
    a1.set_xlim(2, 9)
    a1.legend(fontsize=7)
    groups = [g for g in GROUPS if res.get(g)]
    for (grp, ns), (mk, ls) in zip([(g, s) for g in groups for s in STATES],
                                   [(m, ls) for ls in ("-", "--", ":") for m in ("o", "s")], strict=False):
        rows = sorted((s for s in res["summary"] if s["group"] == grp and s["states"] == ns), key=lambda s: s["target"])
        a2.plot([s["bits"] for s in rows], [s["median_gap_bits"] for s in rows], marker=mk, ls=ls,
                label=f"{grp}: trellis-{ns}")
        if ns == 4:
            a2.plot([s["bits"] for s in rows], [s["median_scalar_gap_bits"] for s in rows], marker="x", ls=ls,
                    color="gray", label=f"{grp}: scalar")
    a2.axhline(0.15, color="red", lw=0.8, ls=":", label="goal 0.15")
    a2.set_xlabel("bits / weight")
    a2.set_ylabel("distance to Shannon lower bound (bits/weight, median)")
    a2.set_ylim(0, 0.4)
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    return save_figure(fig, path)


def report(res: dict) -> str:
    m = res["meta"]
    L = ["# Trellis (dependent) quantization vs uniform scalar quantization", "",
         f"Command: `{m['command']}` ({m['seconds']:.0f} s on 2 shared CPU cores; synthetic seed 0).", "",
         "Scalar: one step per tensor, rANS under the fitted GG + the step (`allocate.real_bits`, what "
         "`ggprior compress` writes). Trellis: `codec.trellis` (VVC-style dependent quantization, Viterbi on "
         f"D + lambda R, lambda = lam_c step^2, lam_c = {T.LAMBDA_C}), rANS with one table per state class, "
         "the index tails escape-coded (indices beyond a bound E: one escape symbol in the table, their values in an "
         "Exp-Golomb side stream; E and prob_bits chosen per payload, `codec.trellis_payload`); bits are the "
         "payload's real bytes (tables, counts, step, escape stream included). Equal MSE: scalar bits interpolated at the trellis "
         "point's MSE. Bound: Shannon lower bound of the fitted GG at that MSE.", "",
         "![trellis](trellis.png)", "", "## lam_c sweep (synthetic tensors, mean over gammas and rates "
         f"{', '.join(str(b) for b in m['params']['tune_rates'])})", "",
         "| states | lam_c | mean gain at equal MSE (bits) | mean distance to bound (bits) |", "|---|---|---|---|"]
    L += [f"| {t['states']} | {t['lam_c']} | {t['mean_gain_bits']:.3f} | {t['mean_gap_bits']:.3f} |" for t in res["tune"]]
    L += ["", "## Per tensor group and rate", "",
          "| group | states | target | tensors | trellis bits | scalar bits (equal MSE) | median gain | "
          "median trellis gap | max trellis gap | median scalar gap | coder overhead | median SQNR (dB) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    L += [f"| {s['group']} | {s['states']} | {s['target']:.0f} | {s['tensors']} | {s['bits']:.3f} | {s['scalar_bits']:.3f} "
          f"| {s['median_gain_bits']:.3f} | {s['median_gap_bits']:.3f} | {s['max_gap_bits']:.3f} | "
          f"{s['median_scalar_gap_bits']:.3f} | {s['median_overhead_bits']:.4f} | {s['median_sqnr_db']:.2f} |"
          for s in res["summary"]]
    L += ["", "Synthetic rows per gamma (4 states):", "", "| tensor | gamma | target | trellis bits | gain | trellis gap "
          "| scalar gap |", "|---|---|---|---|---|---|---|"]
    L += [f"| {r['tensor']} | {r['gamma']:.3f} | {q['target']:.0f} | {q['bits']:.3f} | {q['gain_bits']:.3f} | "
          f"{q['gap_bits']:.3f} | {q['scalar_gap_bits']:.3f} |"
          for r in res["synthetic"] for q in r["trellis"] if q["states"] == 4]
    L += ["", "## Goal of issue 14: distance to the bound <= 0.15 bit", ""] + res["verdict"] + [
        "", "## Read with these in mind", "",
        "* 'coder overhead' is real payload bits minus the empirical conditional entropy of the indices "
        "(tables, counts and rANS's own loss).",
        "* The scalar sizes are rANS under a fitted GG model (a few parameters of side information); the trellis "
        "stores one empirical table per state class (quantizer), which costs more on small tensors.",
        "* The Shannon lower bound is not tight at low rate for gamma < 1 (the true R(D) lies above it), so the "
        "distances at 3 bits overstate both methods' loss there.",
        f"* Quantize time (3 Viterbi passes): median {m['quantize_s_per_mvalue']:.2f} s per million values."]
    return "\n".join(L) + "\n"


def verdict(summary: list[dict]) -> list[str]:
    out = []
    for grp in GROUPS:
        for ns in STATES:
            rows = [s for s in summary if s["group"] == grp and s["states"] == ns]
            if not rows:
                continue
            med = float(np.median([s["median_gap_bits"] for s in rows]))
            worst = max(s["median_gap_bits"] for s in rows)
            ok = "holds" if worst <= 0.15 else "does not hold"
            gain = float(np.median([s["median_gain_bits"] for s in rows]))
            out.append(f"* {grp}, trellis-{ns}: **{ok}** at every measured rate (median over rates of the per-rate "
                       f"median distance {med:.3f}, worst rate {worst:.3f}; median gain over scalar at equal MSE "
                       f"{gain:.3f} bit).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "rate_distortion")
    ap.add_argument("--smollm2-layers", default="", help="comma-separated decoder layers of SmolLM2-135M to add "
                    "(e.g. 0,15,29: 21 matrices, 10.6M weights)")
    a = ap.parse_args()
    p = QUICK if a.quick else FULL
    t0 = time.time()
    syn = synthetic(p["n"])
    res = {"tune": tune(p, syn)}
    print(json.dumps(res["tune"], indent=1))
    res["synthetic"] = [measure(k, w, p["rates"]) for k, w in syn.items()]
    res["minilm"] = []
    for k, w in minilm_matrices(p["minilm_max"]).items():
        res["minilm"].append(measure(k, w, p["rates"]))
        print(k, flush=True)
    res["smollm2"] = []
    if a.smollm2_layers:
        for k, w in smollm2_matrices([int(x) for x in a.smollm2_layers.split(",")]).items():
            res["smollm2"].append(measure(k, w, p["rates"]))
            print(k, flush=True)
    res["summary"] = [s for g in GROUPS if res[g] for s in summarize(res[g], g)]
    res["verdict"] = verdict(res["summary"])
    per_m = [q["quantize_s"] / r["n"] * 1e6 for g in GROUPS for r in res[g] for q in r["trellis"]]
    res["meta"] = {"command": "python " + shlex.join(["experiments/trellis_rd.py", *sys.argv[1:]]),
                   "seconds": time.time() - t0, "params": p, "lam_c": T.LAMBDA_C,
                   "quantize_s_per_mvalue": float(np.median(per_m))}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "trellis.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, a.out / "trellis.png")
    (a.out / "trellis.md").write_text(report(res))
    print("\n".join(res["verdict"]))


if __name__ == "__main__":
    main()
