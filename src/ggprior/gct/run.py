"""One data-parallel run from a :class:`~ggprior.gct.train.DPConfig`: local workers or torchrun's group,
results written to ``OUT/metrics.json`` (``ggprior train --workers N``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import write_text
from .launch import from_env
from .train import DPConfig, data_parallel, main_torchrun


def run_data_parallel(cfg: DPConfig, workers: int, out: str | Path) -> list[dict] | None:
    """Train ``cfg`` on ``workers`` local processes (or join torchrun's group) and write
    ``out/metrics.json``; returns every worker's result (the lead first), None on a non-lead
    torchrun rank."""
    if from_env() is not None:
        lead = main_torchrun(cfg)
        if lead is None:
            return None
        results = [lead]
    else:
        results = data_parallel(cfg, workers)
    lead = results[0]
    write_text(Path(out) / "metrics.json", json.dumps({"workers": lead["workers"], "results": results}, indent=1) + "\n")
    return results
