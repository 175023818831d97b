"""``ggprior train TASK OUT``: train a small model on a task, optionally rate-constrained, and measure it;
with ``--workers N`` data-parallel on torch.distributed with ``--comm``'s gradient communication."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail, need, renamed
from .choices import INIT_SCHEMES, METHODS, QUANT_STEP, RATES

USAGE = "ggprior train TASK OUT [options]"


@app.command("train")
def train_cmd(
    task: str = typer.Argument(None, metavar="TASK", help="sentiment, spam, topic, bbc-lm or dialog-lm"),
    out: Path = typer.Argument(None, metavar="OUT", help="output folder"),
    model: str = typer.Option("bert", "--model", help="bert, gpt2, llama or minilm (pretrained)"),
    init: str = typer.Option("he", "--init", help=f"weight init: {', '.join(INIT_SCHEMES)}"),
    gamma: float = typer.Option(2.0, "--gamma", help="GG shape for --init gg"),
    rate: str = typer.Option("none", "--rate", help=f"rate penalty: {', '.join(RATES)}"),
    lam: float = typer.Option(0.0, "--lam", help="rate weight lambda (step = lambda nu / N per value)"),
    rate_epochs: int | None = typer.Option(None, "--rate-epochs", help="apply the rate in the first K epochs only"),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="BackSlash: one shape per tensor, not pooled"),
    eps: float | None = typer.Option(None, "--eps", help="rate soft clip (default: 1; 0 for l2)"),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="per worker with --workers"),
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
    workers: int = typer.Option(1, "--workers", help="data-parallel worker processes (torch.distributed)"),
    comm: str = typer.Option("gct", "--comm", help=f"with --workers: {', '.join(METHODS)}"),
    comm_coder: str = typer.Option("ans", "--comm-coder", help="--comm gct: entropy coder, ans or eg"),
    comm_rel_step: float = typer.Option(0.05, "--comm-rel-step", help="--comm gct: step as a fraction of the "
                                        "bucket RMS"),
    comm_lam: float = typer.Option(0.0, "--comm-lam", help="--comm gct: rate weight of the rate-constrained "
                                   "quantizer"),
    comm_grad_rate: float = typer.Option(0.0, "--comm-grad-rate", help="--comm gct: secant gradient-rate weight"),
    comm_error_feedback: bool = typer.Option(True, "--comm-error-feedback/--no-comm-error-feedback"),
    comm_exchange: str = typer.Option("auto", "--comm-exchange",
                                      help="--comm gct: auto (all_gather at <= 2 workers, else reduce-scatter), "
                                           "allgather or reduce_scatter"),
    powersgd_rank: int = typer.Option(2, "--powersgd-rank", help="--comm powersgd: rank"),
    timeout: float = typer.Option(300.0, "--timeout", help="with --workers: seconds a collective may wait"),
    old_task: str = typer.Option(None, "--task", hidden=True),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Train, then write metrics.json (each epoch), model.safetensors and compression figures."""
    renamed(old_task, "--task", f"the task is the first argument: {USAGE}")
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    need(task, "TASK", USAGE)
    need(out, "OUT", USAGE)
    from ..gct import from_env
    from ..train.loop import TrainConfig

    if workers > 1 or from_env() is not None:
        if rate != "none" or resume:
            fail("--workers trains with --comm's gradient communication; --rate and --resume are single-process")
        from ..gct import GCTConfig
        from ..gct.train import DPConfig

        dp = DPConfig(method=comm, task=task, model=model, init=init, gamma=gamma, scale=scale, max_len=max_len,
                      max_train=max_train, max_eval=max_eval, timeout=timeout, powersgd_rank=powersgd_rank,
                      gct=GCTConfig(coder=comm_coder, rel_step=comm_rel_step, lam=comm_lam, grad_rate=comm_grad_rate,
                                    error_feedback=comm_error_feedback, exchange=comm_exchange),
                      train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                        progress=False))
        return _data_parallel(dp, workers, out)
    from ..tasks import DataError, ModelError
    from ..train.loop import TrainError
    from ..train.run import RunConfig, run

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


@app.command("gct", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def gct_gone() -> None:
    """Gone: ggprior train TASK OUT --workers N --comm METHOD."""
    fail("ggprior gct is gone: use ggprior train TASK OUT --workers N --comm METHOD (GCT options: --comm-coder, "
         "--comm-rel-step, --comm-lam, --comm-grad-rate, --no-comm-error-feedback)")


def _data_parallel(cfg, workers: int, out: Path) -> None:
    from rich.table import Table

    from ..gct import GCTError
    from ..gct.run import run_data_parallel
    from ..tasks import DataError, ModelError
    from ..train.loop import TrainError

    try:
        results = run_data_parallel(cfg, workers, out)
    except (GCTError, TrainError, DataError, ModelError, ValueError, OSError) as e:
        fail(str(e))
    if results is None:
        return
    lead = results[0]
    c, m = lead["comm"], lead["metrics"]
    metric = "accuracy" if "accuracy" in m["test"] else "perplexity"
    table = Table(title=f"{cfg.method} on {lead['workers']} workers: {cfg.model} / {cfg.task}")
    for col in (f"test {metric}", "bytes/step/worker", "bits/value", "zero frac", "s/step", "hook ms/step",
                "coding ms/step"):
        table.add_column(col, justify="right")
    table.add_row(f"{m['test'][metric]:.4g}", f"{c['bytes_per_step']:,.0f}", f"{c['bits_per_value']:.3f}",
                  f"{c['zero_frac']:.3f}", f"{lead['seconds_per_step']:.3f}", f"{c['hook_ms_per_step']:.1f}",
                  f"{c.get('code_ms_per_step', 0.0):.1f}")
    console.print(table)
    console.print(f"wrote {out / 'metrics.json'}")


def _print_summary(result: dict) -> None:
    from rich.table import Table

    from ..train.run import CODERS

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
