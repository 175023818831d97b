"""``ggprior fit SOURCE OUT``: GG statistics of every tensor, group and the pooled model."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, fail, need, renamed

FIT_COLUMNS = ["name", "group", "shape", "numel", "mu", "beta", "gamma", "std", "gamma_at_bound",
               "fit_method", "entropy_bits", "loglik_gg", "loglik_gauss", "loglik_laplace",
               "ks_gg", "ks_gauss", "ks_laplace", "note"]
USAGE = "ggprior fit SOURCE OUT [options]"


@app.command("fit")
def fit_cmd(
    source: str = typer.Argument(None, metavar="SOURCE", help="a .safetensors file, a HF folder, or a built-in name (minilm)"),
    out: Path = typer.Argument(None, metavar="OUT", help="output folder (fit.{json,csv,md} and plots)"),
    mle: bool = typer.Option(False, "--mle", help="refine each tensor's fit by maximum likelihood"),
    plots: int = typer.Option(0, "--plots", help="plot the pooled rows and this many largest tensors (0: none)"),
    gof_values: int = typer.Option(1 << 16, "--gof-values", help="values (a seeded subsample) for goodness of fit per row"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout (no table)"),
    seed: int = typer.Option(0, "--seed"),
    activations: bool = typer.Option(False, "--activations", help="fit every layer's activations on --task"),
    gradients: bool = typer.Option(False, "--gradients", help="fit every parameter's gradient on --task"),
    task: str = typer.Option("sentiment", "--task", help="task or corpus whose training texts feed --activations/--gradients"),
    text: Path = typer.Option(None, "--text", help="feed the lines of this text file instead of --task"),
    examples: int = typer.Option(64, "--examples", help="examples (at most) fed for --activations/--gradients"),
    batch_size: int = typer.Option(16, "--batch-size", help="batch size for --activations/--gradients"),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Fit a GG to every floating tensor, each layer group and the whole model (or its activations/gradients)."""
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    need(source, "SOURCE", USAGE)
    need(out, "OUT", USAGE)
    if activations or gradients:
        kinds = [k for k, on in (("activations", activations), ("gradients", gradients)) if on]
        return _fit_runtime(source, kinds, task, text, examples, batch_size, out, seed, mle, as_json)
    import torch

    from ..io import SourceError, open_source, write_table
    from ..stats import LINEAR_ROW, MODEL_ROW, fit_model

    try:
        src = open_source(source)
        samples: dict[str, torch.Tensor] = {}
        rows = fit_model(src, mle=mle, max_gof_values=gof_values, seed=seed, pool_samples=samples,
                         progress=not as_json)
    except (SourceError, ValueError, OSError) as e:
        fail(str(e))
    files = write_table(rows, out, "fit", FIT_COLUMNS, title=f"GG fit of {src.label}")
    fitted = {r["name"]: r for r in rows if "gamma" in r}
    pngs = []
    if plots > 0:  # matplotlib only when plotting
        from ..report.plots import plot_fit
    for pool in (MODEL_ROW, LINEAR_ROW)[: max(0, plots)]:
        if pool in samples:
            values = samples[pool]
            pngs.append(plot_fit(values, _as_fit(fitted[pool]), out / f"fit_{pool.strip('_')}.png",
                                 title=f"{src.label}: {pool} (sample of {values.numel():,} values)"))
    largest = sorted((r for r in fitted.values() if not r["name"].startswith(("__", "group:"))),
                     key=lambda r: -r["numel"])[: max(0, plots)]
    for r in largest:
        safe = r["name"].replace("/", "_")
        title = f"{src.label}: {r['name']}"
        pngs.append(plot_fit(src[r["name"]], _as_fit(r), out / f"fit_{safe}.png", title=title))
    _report(rows, ["numel", "mu", "beta", "gamma", "loglik_gg", "loglik_gauss", "ks_gg", "ks_gauss"], as_json,
            f"GG fit of {src.label} (pooled rows; every row in fit.md)")
    console.print(f"wrote {', '.join(str(p) for p in files.values())} and {len(pngs)} plots")


def _fit_runtime(source: str, kinds: list[str], task: str, text: Path | None, examples: int, batch_size: int,
                 out: Path, seed: int, mle: bool, as_json: bool) -> None:
    from ..io import write_table
    from ..stats import HookError
    from ..tasks import DataError, ModelError
    from ..tasks.statistics import RUNTIME_COLUMNS, task_statistics

    try:
        rows, n = task_statistics(source, kinds, task, examples, batch_size, text=text, seed=seed, mle=mle)
    except (DataError, ModelError, HookError, ValueError, OSError) as e:
        fail(str(e))
    fed = text if text is not None else task
    files = write_table(rows, out, "fit_" + "_".join(kinds), RUNTIME_COLUMNS,
                        title=f"GG fit of {source} {' and '.join(kinds)} on {fed} ({n} examples)")
    _report(rows, ["numel", "beta", "gamma", "loglik_gg", "loglik_gauss", "best_law"], as_json,
            f"{source}: pooled {' / '.join(kinds)} on {fed} ({n} examples; every row in {files['md'].name})")
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")


def _as_fit(row: dict):
    from ..gg import GGFit

    return GGFit(mu=row["mu"], beta=row["beta"], gamma=row["gamma"], n=row["numel"], std=row["std"],
                 ratio=float("nan"), at_bound=row["gamma_at_bound"], method=row["fit_method"])


def _report(rows: list[dict], columns: list[str], as_json: bool, title: str) -> None:
    """JSON of every row on stdout, or the pooled rows as a table that fits the console (numbers whole)."""
    import json

    from ..io.tables import to_text

    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    pooled = [r for r in rows if r["name"].startswith(("__", "group:")) and "gamma" in r]
    console.print(title, soft_wrap=True)
    console.print(to_text(pooled, ["name", *columns], console.width), end="", soft_wrap=True)
