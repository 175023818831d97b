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
    model: str = typer.Option(None, "--model",
                              help="minilm (fine-tune the pretrained MiniLM; the default) or small-bert (train a "
                                   "small BERT from scratch: He init + plain vs GG init + BackSlash; the default "
                                   "of --size tiny)"),
    seeds: int = typer.Option(None, "--seeds", help="trainings per variant (seeds SEED, SEED+1, ...); the report "
                                                     "gives the plain-vs-BackSlash comparison as mean and spread"),
    examples: int = typer.Option(None, "--examples", help="training examples (a fixed random subset)"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs of each model"),
    lr: float = typer.Option(None, "--lr", help="learning rate (the DeepShape fine-tune uses lr/10)"),
    gamma: float = typer.Option(None, "--gamma", help="shape of the GG initialization (small-bert)"),
    lam: float = typer.Option(None, "--lam", help="BackSlash rate weight lambda"),
    k_gamma: float = typer.Option(None, "--k-gamma", help="DeepShape target gamma factor"),
    k_beta: float = typer.Option(None, "--k-beta", help="DeepShape target beta factor"),
    bits: int = typer.Option(None, "--bits", help="the paper's grid of the coded files (FL bits per tensor)"),
    rel_error: float = typer.Option(None, "--rel-error", help="default rule of the coded files: per-tensor "
                                                              "relative RMS error"),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda"),
    old_task: str = typer.Option(None, "--task", hidden=True),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Statistics, plain vs BackSlash training over seeds, DeepShape, .ggz coding, RF8 and other formats: one report."""
    renamed(old_task, "--task", f"the task is the first argument: {USAGE}")
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    from ..pipeline import PipelineConfig, PipelineError, run_pipeline

    try:
        cfg = PipelineConfig.preset(size, model, task=task, seeds=seeds, max_examples=examples, epochs=epochs, lr=lr,
                                    gamma=gamma, lam=lam, k_gamma=k_gamma, k_beta=k_beta, bits=bits,
                                    rel_error=rel_error, seed=seed, device=device)
        results = run_pipeline(cfg, out, console=console)
    except (PipelineError, ValueError, OSError) as e:
        fail(str(e))
    console.print(f"report: {results['report']['md']} and {results['report']['html']} "
                  f"({results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU)")
