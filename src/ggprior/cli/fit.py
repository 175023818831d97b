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
    plots: int = typer.Option(4, "--plots", help="plot the pooled rows and this many largest tensors"),
    gof_values: int = typer.Option(1 << 20, "--gof-values", help="values used for goodness of fit per row"),
    seed: int = typer.Option(0, "--seed"),
    activations: bool = typer.Option(False, "--activations", help="fit every layer's activations on --task"),
    gradients: bool = typer.Option(False, "--gradients", help="fit every parameter's gradient on --task"),
    task: str = typer.Option("sentiment", "--task", help="task whose batches feed --activations/--gradients"),
    examples: int = typer.Option(64, "--examples", help="training examples fed for --activations/--gradients"),
    batch_size: int = typer.Option(16, "--batch-size", help="batch size for --activations/--gradients"),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Fit a GG to every floating tensor, each layer group and the whole model (or its activations/gradients)."""
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    need(source, "SOURCE", USAGE)
    need(out, "OUT", USAGE)
    if activations or gradients:
        kinds = [k for k, on in (("activations", activations), ("gradients", gradients)) if on]
        return _fit_runtime(source, kinds, task, examples, batch_size, out, seed, mle)
    import torch

    from ..io import SourceError, open_source, write_table
    from ..report.plots import plot_fit
    from ..stats import LINEAR_ROW, MODEL_ROW, fit_model

    try:
        src = open_source(source)
        samples: dict[str, torch.Tensor] = {}
        rows = fit_model(src, mle=mle, max_gof_values=gof_values, seed=seed, pool_samples=samples)
    except (SourceError, ValueError, OSError) as e:
        fail(str(e))
    files = write_table(rows, out, "fit", FIT_COLUMNS, title=f"GG fit of {src.label}")
    fitted = {r["name"]: r for r in rows if "gamma" in r}
    pngs = []
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
    _print_summary(rows)
    console.print(f"wrote {', '.join(str(p) for p in files.values())} and {len(pngs)} plots")


def _fit_runtime(source: str, kinds: list[str], task: str, examples: int, batch_size: int, out: Path,
                 seed: int, mle: bool) -> None:
    from rich.table import Table

    from ..io import write_table
    from ..stats import HookError
    from ..tasks import DataError, ModelError
    from ..tasks.statistics import RUNTIME_COLUMNS, task_statistics

    try:
        rows, n = task_statistics(source, kinds, task, examples, batch_size, seed=seed, mle=mle)
    except (DataError, ModelError, HookError, ValueError, OSError) as e:
        fail(str(e))
    files = write_table(rows, out, "fit_" + "_".join(kinds), RUNTIME_COLUMNS,
                        title=f"GG fit of {source} {' and '.join(kinds)} on {task} ({n} examples)")
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


def _as_fit(row: dict):
    from ..gg import GGFit

    return GGFit(mu=row["mu"], beta=row["beta"], gamma=row["gamma"], n=row["numel"], std=row["std"],
                 ratio=float("nan"), at_bound=row["gamma_at_bound"], method=row["fit_method"])


def _print_summary(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="GG fit (pooled rows)")
    table.add_column("name", no_wrap=True)
    for col in ("numel", "mu", "beta", "gamma", "loglik_gg", "loglik_gauss", "ks_gg", "ks_gauss"):
        table.add_column(col, justify="right")
    for r in rows:
        if r["name"].startswith(("__", "group:")):
            table.add_row(r["name"], f"{r['numel']:,}", *(f"{r.get(c, float('nan')):.3g}" for c in
                          ("mu", "beta", "gamma", "loglik_gg", "loglik_gauss", "ks_gg", "ks_gauss")))
    console.print(table)
