"""PNG figures: fitted distributions (the paper's Figure 4) and simple x-y curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .. import gg as ggd  # noqa: E402
from ..io.atomic import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_fit(values: torch.Tensor, fit: ggd.GGFit, path: str | os.PathLike, title: str = "") -> Path:
    """Histogram of ``values`` with the GG fit and the Gaussian of the same mean and std.

    Left: linear density over the central 99.8% of the values. Right: log density over the
    full range, where the tails tell GG and Gaussian apart.
    """
    x = values.detach().reshape(-1).to(torch.float64).cpu().numpy()
    mean, std = float(x.mean()), float(x.std())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, log in zip(axes, (False, True), strict=True):
        lo, hi = (np.quantile(x, [0.001, 0.999]) if not log else (x.min(), x.max()))
        if hi <= lo:
            lo, hi = lo - 1.0, hi + 1.0
        ax.hist(x, bins=200, range=(lo, hi), density=True, color="0.75", label="data")
        grid = torch.linspace(float(lo), float(hi), 800, dtype=torch.float64)
        gg = ggd.pdf(grid, fit.mu, fit.beta, fit.gamma).numpy()
        gauss = ggd.pdf(grid, mean, math.sqrt(2.0) * std, 2.0).numpy() if std > 0 else np.zeros_like(gg)
        ax.plot(grid, gg, "C0", lw=1.6, label=f"GG  γ={fit.gamma:.3g}, β={fit.beta:.3g}")
        ax.plot(grid, gauss, "C3--", lw=1.2, label=f"Gaussian  σ={std:.3g}")
        ax.set_xlabel("value")
        ax.set_ylabel("log density" if log else "density")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-4 / max(hi - lo, 1e-12), 1e-12))
        ax.legend(fontsize=8)
    fig.suptitle(title or "GG fit")
    return save_figure(fig, path)


def plot_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *,
    xlabel: str, ylabel: str, title: str = "", logx: bool = False, marker: str = "o",
) -> Path:
    """One line per named (xs, ys) series."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker=marker, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bits(summary: dict, path: str | os.PathLike) -> Path:
    """Bar chart of whole-model bits/weight per coder; returns the PNG path."""
    cs = [k.removeprefix("bpw_") for k in summary if k.startswith("bpw_")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    vals = [summary[f"bpw_{c}"] for c in cs]
    bars = ax.bar(cs, vals, color=["#888" if c in ("entropy", "gg") else "#3a7" for c in cs])
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bits per weight")
    ax.set_title(f"{summary.get('source', '')}: {summary.get('step_rule', '')} (grey: ideal, no side info)")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)
