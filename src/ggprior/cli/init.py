"""``ggprior init CONFIG OUT --gamma G``: write a GG-initialized model (safetensors + config.json)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import OVERWRITE_HELP, app, check_output, console, fail


@app.command("init")
def init_cmd(
    config: str = typer.Argument(..., help="a transformers config.json, a HF folder, minilm, or bert / gpt2 / llama"),
    out: Path = typer.Argument(..., help="output folder (model.safetensors + config.json)"),
    gamma: float = typer.Option(..., "--gamma", help="GG shape of the weights (2 = He init)"),
    nonlinearity: str = typer.Option("relu", "--nonlinearity", help="activation the variance is set for (gelu, "
                                     "silu, relu, linear, tanh, ...)"),
    embeddings: str = typer.Option("shape", "--embeddings", help="shape: re-sample at their own scale; keep"),
    seed: int = typer.Option(0, "--seed"),
    scale: int = typer.Option(1, "--scale", help="size of a built-in architecture"),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="vocabulary of a built-in architecture"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """GG-initialize every weight matrix of CONFIG's model (eq. 6) and write it to OUT."""
    check_output(out, (config,), overwrite=overwrite, writes=(out / "model.safetensors", out / "config.json"))
    from ..tasks import ModelError
    from ..tasks.initialized import write_initialized

    try:
        model, names = write_initialized(config, out, gamma, nonlinearity=nonlinearity, embeddings=embeddings,
                                         seed=seed, scale=scale, vocab_size=vocab_size)
    except (ModelError, ValueError, OSError) as e:
        fail(str(e))
    n = sum(p.numel() for p in model.parameters())
    console.print(f"wrote {out}: {type(model).__name__}, {n:,} parameters, {len(names)} weights GG-initialized "
                  f"(gamma {gamma:g})")
