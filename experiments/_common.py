"""Shared helpers of the training studies: arguments, a parallel grid of runs, mean +- std tables.

Each study builds a list of (tags, :class:`ggprior.train.run.RunConfig`) pairs, runs them with
:func:`run_grid` (worker processes, one torch thread each), flattens every result with
:func:`flatten` and aggregates over seeds with :func:`aggregate`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ggprior.io.atomic import write_text
from ggprior.train.run import CODERS, RunConfig, run

REPO = Path(__file__).resolve().parents[1]


def study_args(doc: str, default_out: str) -> argparse.Namespace:
    """``--quick`` (CI smoke size), ``--out``, ``--jobs`` (worker processes), ``--seeds``."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test size")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / default_out)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 2 full)")
    return ap.parse_args()


def command_line() -> str:
    """The command that is running, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return "python " + shlex.join([str(rel), *sys.argv[1:]])


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _one(cfg: RunConfig) -> dict:
    return run(cfg)


def run_grid(grid: Sequence[tuple[dict, RunConfig]], jobs: int = 1) -> list[dict]:
    """Run every configuration (progress off inside runs); returns ``flatten(tags, result)`` rows in grid order."""
    grid = [(tags, replace(cfg, train=replace(cfg.train, progress=False))) for tags, cfg in grid]
    rows: list[dict | None] = [None] * len(grid)
    if jobs <= 1:
        _init_worker()
        for i, (tags, cfg) in enumerate(tqdm(grid, desc="runs")):
            rows[i] = flatten(tags, _one(cfg))
        return rows  # type: ignore[return-value]
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool:
        futures = {pool.submit(_one, cfg): i for i, (_, cfg) in enumerate(grid)}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            i = futures[fut]
            rows[i] = flatten(grid[i][0], fut.result())
    return rows  # type: ignore[return-value]


def flatten(tags: dict, result: dict) -> dict:
    """One flat row: the tags, the run settings, test metrics (float and quantized), compression, time."""
    row = dict(tags)
    run_cfg = result["run"]
    row.update({k: run_cfg[k] for k in ("task", "model", "init", "gamma", "rate", "lam", "rate_epochs")})
    row["seed"] = result["config"]["seed"]
    row["epochs"] = result["config"]["epochs"]
    metric = "perplexity" if "perplexity" in result["test"] else "accuracy"
    row["metric"] = metric
    row["test"] = result["test"][metric]
    row["test_quantized"] = result["quantized_test"][metric]
    comp = result["compression"]
    for c in CODERS:
        row[f"bpw_{c}"] = comp[f"bpw_{c}"]
        row[f"cr_{c}"] = comp[f"cr_{c}"]
    row["kb_fl"] = comp["model_bytes_fl"] / 1024
    row["kb_eg"] = comp["model_bytes_eg"] / 1024
    last = result["history"][-1]
    row["nu_fit"] = last.get("rate_nu_fit")
    nus = [h["rate_nu_mean"] for h in result["history"] if h.get("rate_nu_mean") is not None]
    row["nu_mean"] = float(np.mean(nus)) if nus else None
    row["parameters"] = result["parameters"]
    row["train_size"] = result["data"]["train"]
    row["seconds"] = result["seconds"]
    return row


def aggregate(rows: Sequence[dict], by: Sequence[str], metrics: Sequence[str], *,
              keep_empty: bool = True) -> list[dict]:
    """Mean and sample std (``<m>_std``) of ``metrics`` over rows sharing the ``by`` keys, in first-seen order.

    A metric no row of a group has is None in that group's row, or absent with ``keep_empty=False``.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        agg = dict(zip(by, key, strict=True))
        agg["n"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals or keep_empty:
                agg[m] = float(np.mean(vals)) if vals else None
                agg[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0 if vals else None
        out.append(agg)
    return out


def pm(row: dict, m: str, digits: int = 3) -> str:
    """``mean ± std`` text of an aggregated metric."""
    v, s = row.get(m), row.get(f"{m}_std")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f} ± {s:.{digits}f}" if row.get("n", 1) > 1 and s is not None else f"{v:.{digits}f}"


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table from a header and rows of cell texts."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, name: str, rows: Sequence[dict], agg: Sequence[dict], meta: dict) -> None:
    """``<name>_runs.json`` (every run), ``<name>.json`` (aggregates + meta), atomically."""
    write_text(out / f"{name}_runs.json", json.dumps(list(rows), indent=1) + "\n")
    write_text(out / f"{name}.json", json.dumps({"meta": meta, "aggregate": list(agg)}, indent=1) + "\n")


def meta(seeds: Sequence[int], started: float, **extra) -> dict:
    """Command, seeds, wall time and machine facts of a study."""
    return {"command": command_line(), "seeds": list(seeds), "wall_seconds": round(time.time() - started, 1),
            "cpus": os.cpu_count(), **extra}
