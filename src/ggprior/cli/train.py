"""``ggprior train``: train a small model on a task, optionally rate-constrained, and measure it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..data import DataError
from ..distributed import from_env
from ..distributed.train import DPConfig
from ..models import INIT_SCHEMES, ModelError
from ..train.backslash import RATES
from ..train.loop import TrainConfig, TrainError
from ..train.run import CODERS, QUANT_STEP, RunConfig, run
from .app import app, console, fail
from .v4 import run_data_parallel


@app.command("train")
def train_cmd(
    task: str = typer.Option("sentiment", "--task", help="sentiment, spam, topic, bbc-lm or dialog-lm"),
    model: str = typer.Option("bert", "--model", help="bert, gpt2, llama or minilm (pretrained)"),
    init: str = typer.Option("he", "--init", help=f"weight init: {', '.join(INIT_SCHEMES)}"),
    gamma: float = typer.Option(2.0, "--gamma", help="GG shape for --init gg"),
    rate: str = typer.Option("none", "--rate", help=f"rate penalty: {', '.join(RATES)}"),
    lam: float = typer.Option(0.0, "--lam", help="rate weight lambda (step = lambda nu / N per value)"),
    rate_epochs: int | None = typer.Option(None, "--rate-epochs", help="apply the rate in the first K epochs only"),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="BackSlash: one shape per tensor, not pooled"),
    eps: float | None = typer.Option(None, "--eps", help="rate soft clip (default: 1; 0 for l2)"),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    scale: int = typer.Option(1, "--scale", help="model size multiplier (hidden 64 s, 2 s layers)"),
    max_len: int = typer.Option(128, "--max-len", help="tokens per example (LM: per block)"),
    max_train: int | None = typer.Option(None, "--max-train", help="seeded subset of the training split"),
    max_eval: int | None = typer.Option(None, "--max-eval", help="seeded subset of validation and test"),
    step: float = typer.Option(QUANT_STEP, "--step", help="quantization step of the compression figures"),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda, cuda:1"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    out: Path = typer.Option(Path("runs/train"), "--out", help="output folder"),
    workers: int = typer.Option(1, "--workers", help="data-parallel worker processes (torch.distributed)"),
    comm: str = typer.Option("gct", "--comm", help="with --workers: allreduce, fp16, powersgd or gct"),
) -> None:
    """Train, then write metrics.json (each epoch), model.safetensors and compression figures."""
    if workers > 1 or from_env() is not None:
        if rate != "none" or resume:
            fail("--workers trains with --comm's gradient communication; --rate and --resume are single-process")
        dp = DPConfig(method=comm, task=task, model=model, init=init, gamma=gamma, scale=scale, max_len=max_len,
                      max_train=max_train, max_eval=max_eval, train=TrainConfig(
                          epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, progress=False))
        run_data_parallel(dp, workers, out)
        return
    cfg = RunConfig(
        task=task, model=model, init=init, gamma=gamma, rate=rate, lam=lam, rate_epochs=rate_epochs,
        per_tensor=per_tensor, eps=eps, scale=scale, max_len=max_len, max_train=max_train, max_eval=max_eval,
        step=step,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress),
    )
    try:
        result = run(cfg, out, resume=resume)
    except (TrainError, DataError, ModelError, ValueError, OSError) as e:
        fail(str(e))
    _print_summary(result)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'model.safetensors'}")


def _print_summary(result: dict) -> None:
    metric = "perplexity" if "perplexity" in result["test"] else "accuracy"
    table = Table(title=f"{result['run']['model']} on {result['task']}: test {metric} "
                        f"{result['test'][metric]:.4g} (quantized {result['quantized_test'][metric]:.4g}), "
                        f"{result['seconds']:.0f} s")
    for col in ("coder", "bits/weight", "CR vs FL", "model bytes"):
        table.add_column(col, justify="right")
    comp = result["compression"]
    for c in CODERS:
        table.add_row(c, f"{comp[f'bpw_{c}']:.3f}", f"{comp[f'cr_{c}']:.3f}", f"{comp[f'model_bytes_{c}']:,.0f}")
    console.print(table)
    console.print(f"quantization step {comp['step']:g} on matrices; norms and biases exact")
