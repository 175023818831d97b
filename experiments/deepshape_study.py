"""DeepShape study (paper Tables 4-6): reshaping, fine-tuning, iterated DeepShape, CR and accuracy.

    python experiments/deepshape_study.py table4 [--quick] [--seeds N] [--jobs J] [--out DIR]
    python experiments/deepshape_study.py table5 ...
    python experiments/deepshape_study.py table5-trained ...
    python experiments/deepshape_study.py table6 ...
    python experiments/deepshape_study.py figure1 [--out DIR]

- table4: K_beta sweep (K_gamma = 1) and K_gamma sweep (K_beta = 1), plus the paper's
  (1.1, 0.7), on a small BERT trained from scratch on sentiment: fitted gamma/beta after
  reshaping against the targets, CR(EG), CR(HM), accuracy right after reshaping and after a
  one-epoch fine-tune. Also the accuracy-against-CR plot.
- table5: all-MiniLM-L6-v2 fine-tuned briefly on sentiment, spam and topic; DeepShape
  (1.1, 0.7) once (reshape, then reshape + fine-tune) and iterated (a second round).
- table5-trained: the same on small BERTs trained from scratch by the trainer on each of the
  three tasks (the models the training issue trains), instead of MiniLM.
- figure1: the distribution of the largest pretrained MiniLM matrix before/after DeepShape
  (the paper's Figure 1), one and two rounds, no fine-tune.
- table6: small BERT, GPT-2 and LLaMA classifiers trained from scratch on sentiment, the same
  DeepShape variants as table5.

Compression (SPEC.md section 4, decided here): the weight matrices (ndim >= 2, the tensors
DeepShape reshapes) are quantized with one absolute step 2^-8 (the training study's step:
a fixed distortion, so a narrower distribution costs fewer bits); norms and biases are not
counted. CR(X) = 10 bits x number of weights / bits of coder X (the paper's FL = 10 bits
reference), X = EG (best order per tensor) or HM (Huffman per tensor), side information
included (``ggprior.compression.measure``). Fitted gamma/beta are per-tensor moment fits,
value-weighted over the reshaped matrices. Accuracy is on a fixed test subset, for the float
model and for the model quantized at the same step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import _common
from ggprior import gg
from ggprior.codec.lengths import measure, quantized_state_dict
from ggprior.deepshape import select_names
from ggprior.deepshape.finetune import deepshape_finetune
from ggprior.io.atomic import write_text
from ggprior.io.sources import open_source
from ggprior.io.tables import to_markdown
from ggprior.report.plots import plt, save_figure
from ggprior.tasks import LABEL_NAMES, get_tokenizer, load_task
from ggprior.tasks.models import build_model, count_parameters, load_minilm
from ggprior.train import Callback, TrainConfig, evaluate, train

REPO = Path(__file__).resolve().parents[1]
STEP = 2.0**-8
FL_BITS = 10
SELECT = "matrices"
PAPER_K = (1.1, 0.7)
K_BETA_SWEEP = (0.9, 0.8, 0.7, 0.6, 0.5)
K_GAMMA_SWEEP = (1.1, 1.2, 1.3, 1.5)


@dataclass(frozen=True)
class Size:
    """Data and training sizes of one model family at one study size."""

    max_len: int
    max_train: int
    max_ft: int
    max_test: int
    base_epochs: int
    base_lr: float
    ft_lr: float
    batch_size: int
    scale: int = 2


SIZES = {
    ("small", "quick"): Size(max_len=32, max_train=256, max_ft=128, max_test=128, base_epochs=1, base_lr=1e-3,
                             ft_lr=1e-4, batch_size=32, scale=1),
    ("small", "full"): Size(max_len=64, max_train=3000, max_ft=1000, max_test=500, base_epochs=3, base_lr=1e-3,
                            ft_lr=1e-4, batch_size=32),
    ("minilm", "quick"): Size(max_len=24, max_train=32, max_ft=16, max_test=32, base_epochs=1, base_lr=5e-5,
                              ft_lr=2e-5, batch_size=16),
    ("minilm", "full"): Size(max_len=32, max_train=320, max_ft=160, max_test=160, base_epochs=1, base_lr=1e-4,
                             ft_lr=2e-5, batch_size=16),
}


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return "python " + shlex.join([str(rel), *sys.argv[1:]])


# --- measurements -----------------------------------------------------------------------------


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def shape_of(model: nn.Module, names: list[str]) -> dict:
    """Value-weighted mean of the per-tensor fitted gamma and beta over ``names``."""
    params = dict(model.named_parameters())
    fits = [(gg.fit(params[k].detach()), params[k].numel()) for k in names]
    n = sum(c for _, c in fits)
    return {"gamma": sum(f.gamma * c for f, c in fits) / n, "beta": sum(f.beta * c for f, c in fits) / n}


def quantized_eval(model: nn.Module, data) -> dict:
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in quantized_state_dict(weights(model), step=STEP, include="matrices").items():
            params[n].copy_(t)
        try:
            return evaluate(model, data)
        finally:
            for n, t in original.items():
                params[n].copy_(t)


def point(model: nn.Module, names: list[str], test, **tags) -> dict:
    """One row: tags, fitted shape, bits/weight and CR against FL 10 bits, float and quantized accuracy."""
    _, s = measure(weights(model), step=STEP, coders=("fl", "eg", "huffman"), include="matrices")
    row = dict(tags)
    row.update(shape_of(model, names))
    row.update(bpw_eg=s["bpw_eg"], bpw_hm=s["bpw_huffman"], bpw_fl_range=s["bpw_fl"],
               cr_eg=FL_BITS / s["bpw_eg"], cr_hm=FL_BITS / s["bpw_huffman"],
               accuracy=evaluate(model, test)["accuracy"], accuracy_q=quantized_eval(model, test)["accuracy"])
    return row


class Probe(Callback):
    """Measures the model when fine-tuning starts, i.e. right after DeepShape reshaped it."""

    def __init__(self, names: list[str], test, **tags):
        self.names, self.test, self.tags, self.row = names, test, tags, None

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.row = point(model, self.names, self.test, **self.tags)


# --- models -----------------------------------------------------------------------------------


def base_model(arch: str, task: str, seed: int, size: Size):
    """A model trained (or, for MiniLM, fine-tuned) briefly on ``task``; its fine-tune and test data."""
    tok = get_tokenizer("minilm") if arch == "minilm" else get_tokenizer("bpe", task, 4096)
    train_d = load_task(task, "train", tok, size.max_len, max_examples=size.max_train, split_seed=0)
    test_d = load_task(task, "test", tok, size.max_len, max_examples=size.max_test, split_seed=0)
    ft_idx = torch.randperm(len(train_d), generator=torch.Generator().manual_seed(1000 + seed))[: size.max_ft]
    ft_d = replace(train_d, split="finetune", tensors={k: v[ft_idx] for k, v in train_d.tensors.items()})
    torch.manual_seed(seed)
    nl = len(LABEL_NAMES[task])
    model = load_minilm(nl) if arch == "minilm" else build_model(
        arch, "classification", vocab_size=tok.vocab_size, num_labels=nl, max_positions=size.max_len,
        pad_id=tok.pad_id, scale=size.scale)
    cfg = TrainConfig(epochs=size.base_epochs, batch_size=size.batch_size, lr=size.base_lr, seed=seed, progress=False)
    base = train(model, train_d, None, cfg)
    return model, ft_d, test_d, base["seconds"]


def ft_config(size: Size, seed: int) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=size.batch_size, lr=size.ft_lr, seed=seed, warmup=0.0, progress=False)


def reshape_rows(model, names, ft_d, test_d, k_gamma, k_beta, size, rounds, **tags) -> list[dict]:
    """Rows for DeepShape (k_gamma, k_beta): reshaped and fine-tuned, per round (the model is changed)."""
    rows = []
    for r in range(1, rounds + 1):
        probe = Probe(names, test_d, **tags, round=r, stage="reshaped", k_gamma=k_gamma, k_beta=k_beta)
        res = deepshape_finetune(model, ft_d, k_gamma, k_beta, epochs=1, rounds=1, config=ft_config(size, tags['seed'] + r),
                                 callbacks=[probe], select=SELECT)[0]
        target = {"gamma_target": res["reshape"]["gamma_target"], "beta_target": res["reshape"]["beta_target"],
                  "gamma_fit_before": res["reshape"]["gamma_before"], "beta_fit_before": res["reshape"]["beta_before"]}
        rows.append({**probe.row, **target})
        rows.append({**point(model, names, test_d, **tags, round=r, stage="fine-tuned", k_gamma=k_gamma,
                             k_beta=k_beta), **target})
    return rows


# --- the three tables -------------------------------------------------------------------------


def job_table4(seed: int, size_name: str) -> list[dict]:
    size = SIZES[("small", size_name)]
    model, ft_d, test_d, secs = base_model("bert", "sentiment", seed, size)
    names = select_names(open_source(weights(model)), SELECT)
    rows = [point(model, names, test_d, seed=seed, stage="base", k_gamma=1.0, k_beta=1.0, round=0)]
    settings = [(1.0, kb) for kb in K_BETA_SWEEP] + [(kg, 1.0) for kg in K_GAMMA_SWEEP] + [PAPER_K]
    for kg, kb in settings:
        rows += reshape_rows(copy.deepcopy(model), names, ft_d, test_d, kg, kb, size, 1, seed=seed)
    return rows


def job_table5(arch: str, task: str, seed: int, size_name: str) -> list[dict]:
    size = SIZES[("minilm" if arch == "minilm" else "small", size_name)]
    t0 = time.perf_counter()
    model, ft_d, test_d, secs = base_model(arch, task, seed, size)
    names = select_names(open_source(weights(model)), SELECT)
    tags = {"arch": arch, "task": task, "seed": seed, "parameters": count_parameters(model)}
    rows = [point(model, names, test_d, **tags, stage="base", k_gamma=1.0, k_beta=1.0, round=0)]
    rows += reshape_rows(model, names, ft_d, test_d, *PAPER_K, size, 2, **tags)
    for r in rows:
        r["job_seconds"] = time.perf_counter() - t0
    return rows


def _run(job) -> list[dict]:
    torch.set_num_threads(1)
    fn, args = job
    return fn(*args)


# --- plots and tables -------------------------------------------------------------------------


def plot_distribution(before: dict, after: dict, names: list[str], path: Path, title: str) -> None:
    """The paper's Figure 1: the largest non-embedding matrix before and after DeepShape, with GG fits."""
    name = max((k for k in names if "embed" not in k), key=lambda k: before[k].numel())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, log in zip(axes, (False, True), strict=True):
        lo, hi = np.quantile(before[name].reshape(-1).numpy(), [0.0005, 0.9995]) if not log else (
            float(before[name].min()), float(before[name].max()))
        grid = torch.linspace(float(lo), float(hi), 600, dtype=torch.float64)
        for label, t, c in (("before", before[name], "C0"), ("after DeepShape", after[name], "C3")):
            x = t.reshape(-1).to(torch.float64)
            f = gg.fit(x)
            ax.hist(x.numpy(), bins=160, range=(lo, hi), density=True, color=c, alpha=0.35)
            ax.plot(grid, gg.pdf(grid, f.mu, f.beta, f.gamma), c, lw=1.4,
                    label=f"{label}: γ={f.gamma:.3f}, β={f.beta:.4f}")
        ax.set_xlabel("weight")
        ax.set_ylabel("log density" if log else "density")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5 / (before[name].numel() * (hi - lo) / 160))
        ax.legend(fontsize=8)
    fig.suptitle(f"{name} ({title}): K_gamma={PAPER_K[0]}, K_beta={PAPER_K[1]}")
    save_figure(fig, path)


def figure1(out: Path) -> None:
    """The largest pretrained MiniLM weight matrix before and after DeepShape (1.1, 0.7), 1 and 2 rounds, no fine-tune."""
    from ggprior.deepshape import reshape_values

    src = open_source("minilm")
    names = [k for k in select_names(src, SELECT) if "embed" not in k]
    name = max(names, key=src.numel)
    before = {name: src[name]}
    once = {name: reshape_values(before[name], *PAPER_K, name=name)[0]}
    twice = {name: reshape_values(once[name], *PAPER_K, name=name)[0]}
    plot_distribution(before, once, [name], out / "figure1_minilm_1round.png", "pretrained MiniLM, 1 round")
    plot_distribution(before, twice, [name], out / "figure1_minilm_2rounds.png", "pretrained MiniLM, 2 rounds")


METRICS = ("gamma", "beta", "gamma_target", "beta_target", "bpw_eg", "bpw_hm", "cr_eg", "cr_hm", "accuracy",
           "accuracy_q")


def aggregate(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    return _common.aggregate(rows, by, METRICS, keep_empty=False)


def with_gains(agg: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Adds the % change of CR(EG), CR(HM) and the accuracy change against the base row of the same key."""
    base = {tuple(r.get(k) for k in key): r for r in agg if r["stage"] == "base"}
    for r in agg:
        b = base[tuple(r.get(k) for k in key)]
        r["cr_eg_gain_pct"] = 100 * (r["cr_eg"] / b["cr_eg"] - 1)
        r["cr_hm_gain_pct"] = 100 * (r["cr_hm"] / b["cr_hm"] - 1)
        r["accuracy_change"] = r["accuracy"] - b["accuracy"]
    return agg


def pm(r: dict, m: str, d: int = 3) -> str:
    s = r.get(f"{m}_std")
    return f"{r[m]:.{d}f} ± {s:.{d}f}" if s else f"{r[m]:.{d}f}"


def table_lines(agg: list[dict], lead: tuple[str, ...]) -> list[dict]:
    out = []
    for r in agg:
        line = {k: r[k] for k in lead}
        line.update({
            "γ fit (target)": f"{r['gamma']:.3f} ({r['gamma_target']:.3f})" if "gamma_target" in r else f"{r['gamma']:.3f}",
            "β fit (target)": f"{r['beta']:.4f} ({r['beta_target']:.4f})" if "beta_target" in r else f"{r['beta']:.4f}",
            "bits/w EG": f"{r['bpw_eg']:.3f}", "CR(EG)": pm(r, "cr_eg"), "ΔCR(EG) %": f"{r['cr_eg_gain_pct']:+.1f}",
            "CR(HM)": pm(r, "cr_hm"), "ΔCR(HM) %": f"{r['cr_hm_gain_pct']:+.1f}", "accuracy": pm(r, "accuracy"),
            "Δacc": f"{r['accuracy_change']:+.3f}", "acc (quantized)": pm(r, "accuracy_q"), "n": r["n"],
        })
        out.append(line)
    return out


def plot_acc_vs_cr(agg: list[dict], path: Path, title: str, label_keys: tuple[str, ...]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, marker in (("base", "s"), ("reshaped", "o"), ("fine-tuned", "^")):
        pts = [r for r in agg if r["stage"] == stage]
        if not pts:
            continue
        ax.errorbar([r["cr_eg"] for r in pts], [r["accuracy"] for r in pts], yerr=[r.get("accuracy_std", 0) for r in pts],
                    fmt=marker, capsize=2, label=stage)
        for r in pts:
            if stage != "base":
                ax.annotate(",".join(str(r[k]) for k in label_keys), (r["cr_eg"], r["accuracy"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("CR(EG) against FL 10 bits (step 2^-8)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_results(out: Path, name: str, rows: list[dict], agg: list[dict], lines: list[dict], meta: dict) -> None:
    write_text(out / f"{name}_runs.json", json.dumps(rows, indent=1) + "\n")
    write_text(out / f"{name}.json", json.dumps({"meta": meta, "aggregate": agg}, indent=1) + "\n")
    write_text(out / f"{name}.md", f"# {name}\n\nCommand: `{meta['command']}` (seeds {meta['seeds']}, "
               f"{meta['wall_seconds']:.0f} s wall)\n\n" + to_markdown(lines) + "\n")


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=("table4", "table5", "table5-trained", "table6", "figure1"))
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test size")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default: 1 quick; table4/6 3, table5 2 full)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "deepshape")
    args = ap.parse_args()
    size = "quick" if args.quick else "full"
    n_seeds = args.seeds or (1 if args.quick else 2 if args.table.startswith("table5") else 3)
    seeds = list(range(n_seeds))
    started = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.table == "figure1":
        torch.set_num_threads(1)
        figure1(out)
        print(f"wrote {out}/figure1_minilm_*.png: {command_line()}")
        return
    if args.table == "table4":
        jobs = [(job_table4, (s, size)) for s in seeds]
        by, lead = ("stage", "k_gamma", "k_beta"), ("stage", "k_gamma", "k_beta")
    elif args.table == "table5":
        jobs = [(job_table5, ("minilm", t, s, size)) for t in ("sentiment", "spam", "topic") for s in seeds]
        by, lead = ("task", "round", "stage"), ("task", "round", "stage")
    elif args.table == "table5-trained":
        jobs = [(job_table5, ("bert", t, s, size)) for t in ("sentiment", "spam", "topic") for s in seeds]
        by, lead = ("task", "round", "stage"), ("task", "round", "stage")
    else:
        jobs = [(job_table5, (a, "sentiment", s, size)) for a in ("bert", "gpt2", "llama") for s in seeds]
        by, lead = ("arch", "round", "stage"), ("arch", "round", "stage")
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(j) for j in jobs]
    rows = [r for res in results for r in res]
    agg = with_gains(aggregate(rows, by), tuple(k for k in by if k not in ("stage", "round", "k_gamma", "k_beta")))
    meta = {"command": command_line(), "seeds": seeds, "size": size, "wall_seconds": time.time() - started,
            "cpus": os.cpu_count(), "step": STEP, "fl_bits": FL_BITS, "select": SELECT, "k_paper": PAPER_K,
            "sizes": {f"{k[0]}": vars(v) for k, v in SIZES.items() if k[1] == size}}
    write_results(out, args.table, rows, agg, table_lines(agg, lead), meta)
    if args.table == "table4":
        plot_acc_vs_cr(agg, out / "table4_accuracy_vs_cr.png", "Table 4: small BERT on sentiment (mean ± std over seeds)",
                       ("k_gamma", "k_beta"))
    else:
        plot_acc_vs_cr(agg, out / f"{args.table}_accuracy_vs_cr.png", f"{args.table}: DeepShape (1.1, 0.7)",
                       (lead[0], "round"))
    print(f"wrote {out}/{args.table}.md in {time.time() - started:.0f} s: {command_line()}")


if __name__ == "__main__":
    main()
