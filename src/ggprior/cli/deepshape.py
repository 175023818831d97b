"""``ggprior deepshape``: reshape a model's weights toward a target GG (Algorithm 1)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import OVERWRITE_HELP, app, check_output, console, fail
from .choices import BIN_WIDTH, N_MIN, SELECT, TAILS


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
    task: str | None = typer.Option(None, "--task", help="fine-tune after reshaping on this task (sentiment, spam, "
                                     "topic; bbc/dialog for LMs)"),
    epochs: int = typer.Option(1, "--epochs", help="fine-tuning epochs per round (with --task; 0: reshape only)"),
    rounds: int = typer.Option(1, "--rounds", help="iterated DeepShape: reshape + fine-tune, this many times"),
    arch: str | None = typer.Option(None, "--arch", help="bert, gpt2 or llama: the model a weights file holds"),
    scale: int = typer.Option(1, "--scale", help="model scale of --arch (ggprior.tasks.models.size_for)"),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="BPE vocabulary of --arch models"),
    max_len: int = typer.Option(128, "--max-len", help="tokens per example"),
    max_train: int | None = typer.Option(None, "--max-train", help="use a seeded subset of the training split"),
    lr: float = typer.Option(2e-5, "--lr", help="fine-tuning learning rate"),
    batch_size: int = typer.Option(32, "--batch-size", help="fine-tuning batch size"),
    seed: int = typer.Option(0, "--seed", help="fine-tuning seed (round r uses seed + r - 1)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Reshape SOURCE's weights toward GG(mu, K_gamma gamma, K_beta beta), optionally fine-tune, and write OUT."""
    if out.suffix != ".safetensors":
        fail(f"{out}: the output must be a .safetensors file")
    check_output(out, (source,), overwrite=overwrite)
    from ..deepshape import deepshape
    from ..io import SourceError, save_tensors, write_table
    from ..tasks import DataError, ModelError

    options = {"select": select, "pooled": pooled, "tails": tails, "bin_width": bin_width, "snap": snap}
    meta = {"deepshape": f"k_gamma={k_gamma} k_beta={k_beta} tails={tails} select={select} pooled={pooled}"}
    try:
        options["n_min"] = parse_n_min(n_min)
        if task is not None:
            _reshape_and_finetune(source, out, k_gamma, k_beta, options, meta, report, task=task, epochs=epochs,
                                  rounds=rounds, arch=arch, scale=scale, vocab_size=vocab_size, max_len=max_len,
                                  max_train=max_train, lr=lr, batch_size=batch_size, seed=seed)
            return
        result = deepshape(source, k_gamma, k_beta, progress=True, **options)
        save_tensors(result.tensors, out, metadata=meta)
    except (SourceError, DataError, ModelError, ValueError, OSError) as e:
        fail(str(e))
    rows = [r.to_row() for r in result.reports]
    if report is not None:
        write_table(rows, report, "deepshape", title=f"DeepShape K_gamma={k_gamma} K_beta={k_beta} of {source}")
    _print_summary(rows)
    console.print(f"reshaped {len(result.reshaped)} tensors; wrote {out}")


def _reshape_and_finetune(source: str, out: Path, k_gamma: float, k_beta: float, options: dict, meta: dict,
                          report: Path | None, *, task: str, epochs: int, rounds: int, arch: str | None, scale: int,
                          vocab_size: int, max_len: int, max_train: int | None, lr: float, batch_size: int,
                          seed: int) -> None:
    from ..deepshape.finetune import deepshape_finetune
    from ..io import save_tensors, write_table
    from ..tasks import load_task, model_for_task
    from ..train import TrainConfig, evaluate

    model, tok = model_for_task(source, task, arch=arch, scale=scale, vocab_size=vocab_size, max_len=max_len)
    train_d = load_task(task, "train", tok, max_len, max_examples=max_train)
    val_d, test_d = (load_task(task, split, tok, max_len) for split in ("validation", "test"))
    before = evaluate(model, test_d)
    cfg = TrainConfig(epochs=max(epochs, 1), batch_size=batch_size, lr=lr, seed=seed)
    rows = deepshape_finetune(model, train_d, k_gamma, k_beta, epochs=epochs, rounds=rounds, config=cfg,
                              eval_data=val_d, **options)
    after = evaluate(model, test_d)
    save_tensors(model.state_dict(), out, metadata={**meta, "task": task, "epochs": epochs, "rounds": rounds})
    table = [{"round": r["round"], **r["reshape"], **{f"reshaped_val_{k}": v for k, v in r.get("reshaped_eval", {}).items()},
              **{k: v for k, v in (r["train"]["history"][-1] if "train" in r else {}).items() if k.startswith("valid")}}
             for r in rows]
    if report is not None:
        write_table(table, report, "deepshape", title=f"DeepShape K_gamma={k_gamma} K_beta={k_beta} of {source}, "
                                                      f"{rounds} round(s) of {epochs} epoch(s) on {task}")
    for r in table:
        console.print(f"round {r['round']}: gamma {r['gamma_before']:.3f} -> {r['gamma_after']:.3f}, beta "
                      f"{r['beta_before']:.4f} -> {r['beta_after']:.4f}, H {r['entropy_before']:.2f} -> "
                      f"{r['entropy_after']:.2f} bits/value")
    console.print(f"test {_fmt(before)} before, {_fmt(after)} after; wrote {out}")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _print_summary(rows: list[dict]) -> None:
    from rich.table import Table

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
