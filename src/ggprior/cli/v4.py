"""v4 commands: ``ggprior gct`` (data-parallel training with a gradient-communication method) and the
helpers behind ``ggprior fit --activations/--gradients`` and ``ggprior train --workers N``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..data import DataError, batches, get_tokenizer, load_task
from ..distributed import METHODS, GCTConfig, GCTError, from_env
from ..distributed.train import DPConfig, data_parallel, main_torchrun
from ..fileio import write_text
from ..hooks import HookError, activation_statistics, gradient_statistics
from ..models import ModelError, load_minilm
from ..report import write_table
from ..train.loop import TrainConfig, TrainError
from .app import app, console, fail

RUNTIME_COLUMNS = ["name", "kind", "group", "numel", "mu", "beta", "gamma", "std", "gamma_at_bound", "entropy_bits",
                   "mu_mle", "beta_mle", "gamma_mle", "loglik_gg_mle", "loglik_gg", "loglik_gauss", "loglik_laplace", "ks_gg", "ks_gauss", "ks_laplace", "best_law", "note"]


def fit_runtime(source: str, kinds: list[str], task: str, examples: int, batch_size: int, out: Path,
                seed: int = 0, mle: bool = False) -> None:
    """``ggprior fit SOURCE --activations/--gradients --task T``: GG rows of activations/gradients."""
    if source != "minilm":
        fail(f"--activations/--gradients run the model: only the built-in 'minilm' is supported, got {source!r}")
    try:
        tok = get_tokenizer("minilm")
        data = load_task(task, "train", tok, 128, max_examples=examples)
        model = load_minilm(max(data.num_labels, 2))
    except (DataError, ModelError, ValueError, OSError) as e:
        fail(str(e))
    if data.kind != "classification":
        fail(f"task {task!r} is a language-modelling corpus; MiniLM needs a classification task")
    rows = []
    try:
        if "activations" in kinds:
            rows += activation_statistics(model, lambda: batches(data, batch_size), seed=seed, mle=mle)
        if "gradients" in kinds:
            rows += gradient_statistics(model, lambda: batches(data, batch_size), seed=seed, mle=mle)
    except HookError as e:
        fail(str(e))
    files = write_table(rows, out, "fit_" + "_".join(kinds), RUNTIME_COLUMNS,
                        title=f"GG fit of {source} {' and '.join(kinds)} on {task} ({len(data)} examples)")
    table = Table(title=f"{source}: pooled {' / '.join(kinds)}")
    table.add_column("name", no_wrap=True)
    for col in ("numel", "beta", "gamma", "loglik_gg", "loglik_gauss", "best_law"):
        table.add_column(col, justify="right")
    for r in rows:
        if r["name"].startswith(("__", "group:")) and "gamma" in r:
            table.add_row(r["name"], f"{r['numel']:,}", f"{r['beta']:.3g}", f"{r['gamma']:.3g}",
                          f"{r.get('loglik_gg', float('nan')):.3g}", f"{r.get('loglik_gauss', float('nan')):.3g}",
                          r.get("best_law", ""))
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")


def run_data_parallel(cfg: DPConfig, workers: int, out: Path) -> dict | None:
    """Train ``cfg`` on ``workers`` local processes (or join torchrun's group); write and print the result."""
    try:
        if from_env() is not None:
            lead = main_torchrun(cfg)
            if lead is None:
                return None
            results = [lead]
        else:
            results = data_parallel(cfg, workers)
    except (GCTError, TrainError, DataError, ModelError, ValueError, OSError) as e:
        fail(str(e))
    lead = results[0]
    write_text(out / "metrics.json", json.dumps({"workers": lead["workers"], "results": results}, indent=1) + "\n")
    c, m = lead["comm"], lead["metrics"]
    metric = "accuracy" if "accuracy" in m["test"] else "perplexity"
    table = Table(title=f"{cfg.method} on {lead['workers']} workers: {cfg.model} / {cfg.task}")
    for col in (f"test {metric}", "bytes/step/worker", "bits/value", "zero frac", "s/step", "hook ms/step", "coding ms/step"):
        table.add_column(col, justify="right")
    table.add_row(f"{m['test'][metric]:.4g}", f"{c['bytes_per_step']:,.0f}", f"{c['bits_per_value']:.3f}",
                  f"{c['zero_frac']:.3f}", f"{lead['seconds_per_step']:.3f}", f"{c['hook_ms_per_step']:.1f}",
                  f"{c.get('code_ms_per_step', 0.0):.1f}")
    console.print(table)
    console.print(f"wrote {out / 'metrics.json'}")
    return lead


@app.command("gct")
def gct_cmd(
    method: str = typer.Option("gct", "--method", help=f"gradient communication: {', '.join(METHODS)}"),
    workers: int = typer.Option(2, "--workers", help="local worker processes (ignored under torchrun)"),
    coder: str = typer.Option("ans", "--coder", help="GCT entropy coder: ans or eg"),
    rel_step: float = typer.Option(0.05, "--rel-step", help="GCT quantization step as a fraction of the bucket RMS"),
    lam: float = typer.Option(0.0, "--lam", help="GCT rate weight of the rate-constrained quantizer"),
    grad_rate: float = typer.Option(0.0, "--grad-rate", help="GCT secant gradient-rate term weight"),
    error_feedback: bool = typer.Option(True, "--error-feedback/--no-error-feedback"),
    exchange: str = typer.Option("auto", "--exchange",
                                 help="GCT exchange: auto (all_gather at <= 2 workers, else reduce-scatter), "
                                      "allgather or reduce_scatter"),
    powersgd_rank: int = typer.Option(2, "--powersgd-rank"),
    task: str = typer.Option("sentiment", "--task"),
    model: str = typer.Option("bert", "--model", help="bert, gpt2, llama or minilm"),
    scale: int = typer.Option(1, "--scale"),
    epochs: int = typer.Option(2, "--epochs"),
    batch_size: int = typer.Option(16, "--batch-size", help="per worker"),
    lr: float = typer.Option(2e-3, "--lr"),
    max_len: int = typer.Option(64, "--max-len"),
    max_train: int | None = typer.Option(None, "--max-train"),
    max_eval: int | None = typer.Option(None, "--max-eval"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (nccl, one GPU per worker)"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds a collective may wait for a worker"),
    out: Path = typer.Option(Path("runs/gct"), "--out"),
) -> None:
    """Data-parallel training on torch.distributed with one gradient-communication method; bytes, accuracy, time."""
    cfg = DPConfig(method=method, task=task, model=model, scale=scale, max_len=max_len, max_train=max_train,
                   max_eval=max_eval, timeout=timeout, powersgd_rank=powersgd_rank,
                   gct=GCTConfig(coder=coder, rel_step=rel_step, lam=lam, grad_rate=grad_rate,
                                 error_feedback=error_feedback, exchange=exchange),
                   train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                     progress=False))
    run_data_parallel(cfg, workers, out)
