"""The pipeline's report: plots, ``report.md`` and a self-contained ``report.html`` (tables from :mod:`.summary`)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ..io.atomic import write_text
from ..io.tables import to_markdown
from ..report.plots import plt, save_figure
from .summary import (
    COLUMNS,
    GRID_COLUMNS,
    SEED_COLUMNS,
    STAGE_COLUMNS,
    compute_seconds,
    default_rule,
    findings,
    grid_rows,
    label,
    seed_rows,
    stage_rows,
    summary_rows,
)


def _linear_weights(path: Path) -> np.ndarray:
    sd = load_file(str(path))
    parts = [t.float().numpy().ravel() for k, t in sd.items()
             if t.ndim == 2 and t.dtype.is_floating_point and "embed" not in k]
    return np.concatenate(parts) if parts else np.zeros(1)


def plot_distributions(out: Path, results: dict) -> Path:
    """Log-density histograms of the linear weights of every variant (before/after DeepShape)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, base in zip(axes, ("plain", "backslash"), strict=True):
        for v in results["compress"]:
            if v.split("+")[0] != base:
                continue
            w = _linear_weights(out / "models" / f"{v}.safetensors")
            lim = float(np.quantile(np.abs(w), 0.999)) or 1.0
            ax.hist(w, bins=300, range=(-lim, lim), density=True, histtype="step", lw=1.3, label=label(results, v))
        ax.set_yscale("log")
        ax.set_xlabel("weight value (linear layers)")
        ax.set_ylabel("log density")
        ax.legend(fontsize=8)
    fig.suptitle("Weight distributions before and after DeepShape")
    return save_figure(fig, out / "plots" / "distributions.png")


def plot_rate_accuracy(out: Path, results: dict, rows: list[dict]) -> Path:
    """Accuracy against bits/weight of every stored variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        pts = [r for r in rows if r["variant"] == variant]
        ax.scatter([r["bits/weight"] for r in pts], [r["accuracy"] for r in pts], color=f"C{i}",
                   label=label(results, variant), s=22)
        best = min((r for r in pts if r["format"].startswith("ggz")), key=lambda r: r["bits/weight"], default=None)
        if best:
            ax.annotate(best["format"], (best["bits/weight"], best["accuracy"]), fontsize=7, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (file size / values)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Rate against accuracy: every variant in every storage format")
    return save_figure(fig, out / "plots" / "rate_accuracy.png")


def plot_formats(out: Path, results: dict, rows: list[dict]) -> Path:
    """Grouped bars: accuracy of every variant in every number format."""
    fmts = list(dict.fromkeys(r["format"] for r in rows if not r["format"].startswith(("ggz", "zstd"))))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(fmts)), 4.2))
    width = 0.8 / max(1, len(variants))
    accs = [r["accuracy"] for r in rows]
    for i, v in enumerate(variants):
        acc = {r["format"]: r["accuracy"] for r in rows if r["variant"] == v}
        ax.bar(np.arange(len(fmts)) + i * width, [acc.get(f, math.nan) for f in fmts], width, label=label(results, v))
    ax.set_xticks(np.arange(len(fmts)) + width * (len(variants) - 1) / 2, fmts, rotation=30)
    ax.set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.03))
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.set_title("Number formats: accuracy of each variant")
    return save_figure(fig, out / "plots" / "formats.png")


def plot_training(out: Path, results: dict) -> Path:
    """Validation accuracy per epoch of every training run (both variants, every seed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, base in enumerate(("plain", "backslash")):
        for j, (seed, pair) in enumerate(results["seeds"].items()):
            hist = pair[base]["train"]["history"]
            ax.plot([h["epoch"] for h in hist], [h.get("validation_accuracy", math.nan) for h in hist], marker="o",
                    color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], label=f"{label(results, base)}, seed {seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out / "plots" / "training.png")


def _pretrained_table(results: dict) -> str:
    cols = ["name", "numel", "mu", "beta", "gamma", "ks_gg", "ks_gauss", "loglik_gg", "loglik_gauss"]
    return to_markdown([{c: r.get(c) for c in cols} for r in results["stats"]["pooled"]], cols)


def _setup(results: dict) -> str:
    """The paragraph saying what ran."""
    cfg = results["config"]
    data = (f"{cfg['task']}, {cfg['max_examples'] or 'all'} training examples, {cfg['eval_examples'] or 'all'} "
            f"validation and test examples, max_len {cfg['max_len']}, batch {cfg['batch_size']}")
    params = results["train"]["plain"]["parameters"]
    if cfg["model"] == "minilm":
        model = (f"pretrained {cfg['pretrained']} ({params:,} parameters) fine-tuned with a fresh classification head "
                 f"for {cfg['epochs']} epoch(s) at lr {cfg['lr']:g} (AdamW, 10% warmup, linear decay), plainly and with "
                 f"BackSlash towards the GG prior ({cfg['update']} step, lambda {cfg['lam']:g}, over every matrix, "
                 f"shape re-estimated every step, {cfg['backslash_epochs']} epoch(s)). GG *init* does not apply to "
                 f"pretrained weights: both runs start from the same pretrained weights and head")
    else:
        model = (f"small {cfg['arch']} (scale {cfg['scale']}, {params:,} parameters, BPE vocabulary "
                 f"{cfg['vocab_size']}) trained from scratch for {cfg['epochs']} epochs at lr {cfg['lr']:g}: He init + "
                 f"plain, and GG init (gamma {cfg['gamma']}) + BackSlash ({cfg['update']} step, lambda "
                 f"{cfg['lam']:g}, {cfg['backslash_epochs']} epoch(s))")
    wall, cpu = compute_seconds(results)
    return (f"Task: {data}. Model: {model}. Seeds {', '.join(results['seeds'])}; the first also goes through "
            f"DeepShape (K_gamma {cfg['k_gamma']}, K_beta {cfg['k_beta']}, then {cfg['finetune_epochs']} plain "
            f"epoch(s) at lr/10), every coder and every format. torch threads {results['threads']} (training is "
            f"deterministic for a given seed and thread count). Compute time {wall:.0f} s wall, {cpu:.0f} s CPU "
            f"summed over the stages when they were computed (this invocation: {results['seconds']:.0f} s wall, "
            f"{results['cpu_seconds']:.0f} s CPU; cached stages are reused, not rerun).")


def _grid_rule(results: dict) -> str:
    """The name of the second step rule (the paper's FL grid)."""
    return list(next(iter(results["compress"].values()))["rules"])[1]


def _markdown(results: dict, rows: list[dict], plots: dict[str, Path], facts: list[str]) -> str:
    cfg = results["config"]
    rule, grid = default_rule(results), _grid_rule(results)
    lines = [
        f"# ggprior pipeline: {cfg['task']} ({cfg['model']})", "", _setup(results), "",
        "Accuracy is on the test split. Bits/weight and size are those of the real file on disk over every floating "
        "value of the model (side information and headers included). CR(EG) and CR(HM) are the paper's ratios "
        "against fixed-length coding on the same grid.", "",
        "## Findings", "", *[f"- {f}" for f in facts], "",
        "## Plain against BackSlash over seeds", "",
        f"fp32 test accuracy of each training, and the ANS-coded file of it under the default rule ({rule}).", "",
        to_markdown(seed_rows(results), SEED_COLUMNS), "",
        "## Summary", "",
        f"Seed {cfg['seed']}. Coded files (`ggz-*`, and zstd of the same integers) under the library's default rule: "
        f"per tensor, the largest step with relative RMS error <= {cfg['rel_error']:g}.", "",
        to_markdown(rows, COLUMNS), "",
        f"## Coded files on the paper's grid ({grid})", "",
        f"Seed {cfg['seed']}. Per tensor, a {cfg['bits']}-bit symmetric FL grid over the tensor's range; "
        "bits/weight of the real files.", "",
        to_markdown(grid_rows(results, grid), GRID_COLUMNS), "",
        "## Stage times", "",
        "Wall and CPU seconds of each stage when it was computed (CPU: this process, all threads), the 1-minute "
        "load average at its end, and torch's thread count.", "",
        to_markdown(stage_rows(results), STAGE_COLUMNS), "",
        f"## GG statistics of the pretrained model ({results['stats']['source']})", "",
        _pretrained_table(results), "",
        "## Plots", "",
    ]
    lines += [f"![{name}]({p.relative_to(p.parent.parent).as_posix()})" for name, p in plots.items()]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(results: dict, rows: list[dict], plots: dict[str, Path], facts: list[str]) -> str:
    cfg = results["config"]
    grid = _grid_rule(results)
    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(n)}</figcaption></figure>'
        for n, p in plots.items())
    items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:nth-child(-n+2){text-align:left}img{max-width:100%}")
    title = html.escape(f"ggprior pipeline: {cfg['task']} ({cfg['model']})")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body><h1>{title}</h1><p>{html.escape(_setup(results))}</p><h2>Findings</h2><ul>{items}</ul>"
            f"<h2>Plain against BackSlash over seeds</h2>{_html_table(seed_rows(results), SEED_COLUMNS)}"
            f"<h2>Summary</h2>{_html_table(rows, COLUMNS)}<h2>Coded files on the paper's grid ({html.escape(grid)})</h2>"
            f"{_html_table(grid_rows(results, grid), GRID_COLUMNS)}<h2>Stage times</h2>"
            f"{_html_table(stage_rows(results), STAGE_COLUMNS)}<h2>Plots</h2>{imgs}</body></html>\n")


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` under ``out``; returns their paths."""
    rows = summary_rows(results)
    plots = {
        "distributions": plot_distributions(out, results),
        "rate_accuracy": plot_rate_accuracy(out, results, rows),
        "formats": plot_formats(out, results, rows),
        "training": plot_training(out, results),
    }
    pre = out / "plots" / "pretrained_fit.png"
    if pre.is_file():
        plots["pretrained_fit"] = pre
    facts = findings(results, rows)
    return {
        "md": write_text(out / "report.md", _markdown(results, rows, plots, facts)),
        "html": write_text(out / "report.html", _html(results, rows, plots, facts)),
        **plots,
    }
