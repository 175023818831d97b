"""``ggprior deepshape``: reshape a model's weights toward a target GG (Algorithm 1)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..deepshape import BIN_WIDTH, N_MIN, SELECT, TAILS, deepshape, save_tensors
from ..report import write_table
from ..sources import SourceError
from .app import app, console, fail


def parse_n_min(text: str) -> int | float:
    """An integer count ("1000") or a fraction of the fullest bin ("1e-3", "0.001")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--n-min must be an integer count or a fraction, got {text!r}") from None


@app.command("deepshape")
def deepshape_cmd(
    source: str = typer.Argument(..., help="a .safetensors file, a HF folder, a .bin/.pt state dict, or minilm"),
    out: Path = typer.Argument(..., help="the reshaped model, written as a .safetensors file"),
    k_gamma: float = typer.Option(1.1, "--k-gamma", help="target gamma = K_gamma x fitted gamma"),
    k_beta: float = typer.Option(0.7, "--k-beta", help="target beta = K_beta x fitted beta"),
    select: str = typer.Option("matrices", "--select", help=f"which tensors: {', '.join(SELECT)}"),
    pooled: bool = typer.Option(False, "--pooled", help="one fit and one remap over all selected tensors"),
    tails: str = typer.Option("scale", "--tails", help=f"low-count tails: {', '.join(TAILS)}"),
    n_min: str = typer.Option(str(N_MIN), "--n-min", help="tail cut: a count (1000) or a fraction of the fullest bin"),
    bin_width: float = typer.Option(BIN_WIDTH, "--bin-width", help="histogram bin width"),
    snap: bool = typer.Option(False, "--snap", help="put remapped values on bin centres (the grid)"),
    report: Path | None = typer.Option(None, "--report", help="folder for deepshape.{json,csv,md}"),
) -> None:
    """Reshape SOURCE's weights toward GG(mu, K_gamma gamma, K_beta beta) and write OUT."""
    if out.suffix != ".safetensors":
        fail(f"{out}: the output must be a .safetensors file")
    try:
        result = deepshape(
            source, k_gamma, k_beta, select=select, pooled=pooled, tails=tails, n_min=parse_n_min(n_min),
            bin_width=bin_width, snap=snap, progress=True,
        )
        save_tensors(result.tensors, out, metadata={"deepshape": f"k_gamma={k_gamma} k_beta={k_beta} "
                                                    f"tails={tails} select={select} pooled={pooled}"})
    except (SourceError, ValueError, OSError) as e:
        fail(str(e))
    rows = [r.to_row() for r in result.reports]
    if report is not None:
        write_table(rows, report, "deepshape", title=f"DeepShape K_gamma={k_gamma} K_beta={k_beta} of {source}")
    _print_summary(rows)
    console.print(f"reshaped {len(result.reshaped)} tensors; wrote {out}")


def _print_summary(rows: list[dict]) -> None:
    table = Table(title="DeepShape: whole-tensor fits before -> after (target); H = bits/value on the bin grid")
    for col in ("tensor", "tails %", "gamma", "beta", "H"):
        table.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
    show = rows if len(rows) <= 12 else rows[:6] + rows[-6:]
    for r in show:
        table.add_row(
            r["name"], f"{100 * r['tail_frac']:.3f}",
            f"{r['gamma_before']:.3f} -> {r['gamma_after']:.3f} ({r['gamma_target']:.3f})",
            f"{r['beta_before']:.4f} -> {r['beta_after']:.4f} ({r['beta_target']:.4f})",
            f"{r['entropy_before']:.2f} -> {r['entropy_after']:.2f}",
        )
    n = sum(r["numel"] for r in rows)
    h0 = sum(r["entropy_before"] * r["numel"] for r in rows) / n
    h1 = sum(r["entropy_after"] * r["numel"] for r in rows) / n
    console.print(table)
    if len(rows) > len(show):
        console.print(f"({len(rows) - len(show)} more rows: use --report)")
    console.print(f"entropy on the bin grid over {n:,} values: {h0:.3f} -> {h1:.3f} bits/value "
                  f"({100 * (h1 - h0) / h0:+.1f}%)")
