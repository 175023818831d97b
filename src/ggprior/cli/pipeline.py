"""``ggprior pipeline TASK OUT``: the whole framework end to end on one task, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail, renamed

USAGE = "ggprior pipeline [TASK] [OUT] [options]"


@app.command("pipeline")
def pipeline_cmd(
    task: str = typer.Argument("sentiment", metavar="TASK", help="sentiment, spam or topic"),
    out: Path = typer.Argument(Path("runs/pipeline"), metavar="OUT", help="output folder (stages cached here)"),
    size: str = typer.Option("default", "--size", help="default (minutes) or tiny (a smoke run)"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs of each model"),
    gamma: float = typer.Option(None, "--gamma", help="shape of the GG initialization"),
    lam: float = typer.Option(None, "--lam", help="BackSlash rate weight lambda"),
    k_gamma: float = typer.Option(None, "--k-gamma", help="DeepShape target gamma factor"),
    k_beta: float = typer.Option(None, "--k-beta", help="DeepShape target beta factor"),
    bits: int = typer.Option(None, "--bits", help="quantization grid of the coded files (FL bits per tensor)"),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda"),
    old_task: str = typer.Option(None, "--task", hidden=True),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Statistics, GG init + BackSlash vs He + plain, DeepShape, .ggz coding, RF8 and other formats: one report."""
    renamed(old_task, "--task", f"the task is the first argument: {USAGE}")
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    from ..pipeline import PipelineConfig, PipelineError, run_pipeline

    try:
        cfg = PipelineConfig.preset(size, task=task, epochs=epochs, gamma=gamma, lam=lam, k_gamma=k_gamma,
                                    k_beta=k_beta, bits=bits, seed=seed, device=device)
        results = run_pipeline(cfg, out, console=console)
    except (PipelineError, ValueError, OSError) as e:
        fail(str(e))
    console.print(f"report: {results['report']['md']} and {results['report']['html']} "
                  f"({results['seconds']:.0f} s)")
