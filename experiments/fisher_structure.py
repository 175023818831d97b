"""How much a step field shaped by the Fisher could save over one step per tensor, on SmolLM2 (cross-validated).

    python experiments/fisher_structure.py [--work WORK] [--tokens 4096]

SmolLM2-135M (its GGUF dequantized to float32) is saved once as a folder ``WORK/smollm2-hf``, as in
experiments/calibration.py.

The diagonal Fisher of SmolLM2-135M's own next-token distribution (``kind="fisher"``'s loss, labels drawn from the
softmax, seed 0) is accumulated per weight on bbc-lm train blocks of 256 tokens, alternate blocks into two halves.
For every matrix, a step field ``g_ij`` (normalised to geometric mean 1, so the rate at high rate is unchanged) is
fitted on one half: the row means (``row``), the column means (``col``), their product (``rank1``, what
``codec.channels`` uses) or the elements themselves (``elem``); scored on the other half, the high-rate saving is
``-1/2 log2(mean(F / g) / mean(F))`` bits/weight (steps ``~ g^(-1/2)``), averaged over both directions and over
the matrices by size. No clamps, no low-rate effects: an upper bound on what steps shaped this way can buy.
Writes docs/results/channel_scales/fisher_structure.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ggprior.codec.sensitivity import _fisher_loss, _forward, _load_for_calibration, _text_blocks
from ggprior.tasks.data import calibration_texts

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("row", "col", "rank1", "elem")


def saving(fa: torch.Tensor, fb: torch.Tensor, how: str) -> float:
    """High-rate bits/weight saved on ``fb`` by steps shaped by ``fa`` (see the module docstring)."""
    if how == "row":
        g = fa.mean(1, keepdim=True).expand_as(fa)
    elif how == "col":
        g = fa.mean(0, keepdim=True).expand_as(fa)
    elif how == "rank1":
        g = fa.mean(1, keepdim=True) * fa.mean(0, keepdim=True)
    else:
        g = fa
    g = g.clamp_min(float(g.max()) * 1e-8)
    g = g / torch.exp(torch.log(g).mean())
    return -0.5 * math.log2(float((fb / g).mean() / fb.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "channel_scales")
    a = ap.parse_args()
    torch.manual_seed(0)
    folder = a.work / "smollm2-hf"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO / "experiments"))
        from formats_study import load_smollm2

        m, t = load_smollm2()
        m.save_pretrained(folder)
        t.save_pretrained(folder)
    model, tok = _load_for_calibration(folder)
    blocks = _text_blocks(tok, calibration_texts("bbc-lm"), a.tokens, 256, torch.device("cpu"))
    params = {k: p for k, p in model.named_parameters() if p.dim() == 2}
    acc = [{k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()} for _ in range(2)]
    gens: dict = {}
    for i, b in enumerate(blocks):
        model.zero_grad(set_to_none=True)
        _fisher_loss(_forward(model, b), b, gens, 0).backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[i % 2][k] += p.grad.double() ** 2
    rows = []
    for k, p in params.items():
        fa, fb = acc[0][k], acc[1][k]
        if float(fa.sum()) == 0 or float(fb.sum()) == 0:
            continue
        rows.append({"tensor": k, "n": p.numel(),
                     **{h: (saving(fa, fb, h) + saving(fb, fa, h)) / 2 for h in FIELDS}})
    n = sum(r["n"] for r in rows)
    mean = {h: sum(r["n"] * r[h] for r in rows) / n for h in FIELDS}
    command = "python " + " ".join(["experiments/fisher_structure.py", *sys.argv[1:]])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fisher_structure.json").write_text(json.dumps({"command": command, "blocks": len(blocks),
                                                              "mean_bits_saved": mean, "tensors": rows}, indent=1))
    md = ["# How much a Fisher-shaped step field could save (SmolLM2-135M, high rate, cross-validated)", "",
          f"Command: `{command}` ({len(blocks)} blocks of 256 bbc-lm train tokens, alternate blocks in two halves; "
          "Fisher label draws seed 0). Method: the module docstring of `experiments/fisher_structure.py`.", "",
          "| step field fitted on one half | bits/weight saved on the other half (mean over matrices by size) |",
          "|---|---|"]
    md += [f"| {h} | {mean[h]:.3f} |" for h in FIELDS]
    md += ["", "`rank1` (row mean x column mean) is what `codec.channels` stores; `elem` (a step per weight) fits the "
           "noise of the half it was fitted on and saves less. These are high-rate savings without clamps; what the "
           "clamped scales buy in real files is in [README.md](README.md) and docs/results/rate_distortion.", ""]
    (a.out / "fisher_structure.md").write_text("\n".join(md))
    print(json.dumps(mean, indent=1))


if __name__ == "__main__":
    main()
