"""The whole framework end to end on one task: ``ggprior pipeline``.

Stages (:mod:`.stages`), each cached under ``out/stages/`` (a stage whose inputs did not change is
not run again, so an interrupted run resumes; training also resumes from its epoch checkpoints):

1. ``stats``: GG statistics of the pretrained model (MiniLM; ``ggprior fit``); ``reference``: TF-IDF +
   logistic regression on the same examples (where scikit-learn is installed).
2. ``train``, for every seed: two models trained from the same seed. With ``model="minilm"`` (default)
   the pretrained MiniLM is fine-tuned plainly, and with BackSlash towards the GG prior (its rate is
   the GG code length of the weights, shape re-estimated every step; GG *init* does not apply to
   pretrained weights). With ``model="small-bert"`` a small BERT is trained from scratch: He init +
   plain, and GG init + BackSlash.
3. ``deepshape`` (first seed): DeepShape on both trained models, then a short plain fine-tune.
4. ``compress`` (first seed): every variant quantized per tensor under two rules, the library's
   default (relative RMS error 0.005) and the paper's FL = 10-bit grid, and written as ``.ggz`` files
   with every coder (FL, Exp-Golomb, Huffman, ANS under the GG model), plus zstd of the same integers;
   the files are read back and the decoded model evaluated. ``code`` (later seeds): the ANS file under
   the default rule, for the seed comparison.
5. ``formats`` (first seed): every variant in RF8 (truncating and round-to-nearest), FP16, BF16, FP8
   and int8, each saved as a file and evaluated.
6. ``report``: ``report.md`` and a self-contained ``report.html`` (:mod:`.report`).

Sizes and bits/weight are those of the real files on disk divided by the number of floating
values in the model (every tensor, norms and biases included), so every row is comparable.
Training is deterministic for a given seed and torch thread count (the report states both).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from ..io.atomic import write_text
from .config import BASES, VARIANTS, PipelineConfig
from .context import Context, key_of
from .stages import (
    stage_code,
    stage_compress,
    stage_deepshape,
    stage_formats,
    stage_reference,
    stage_stats,
    stage_train,
)


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike, *, console: Console | None = None,
                 progress: bool = True) -> dict:
    """Run every stage (cached under ``out``) and write ``report.md`` / ``report.html``; returns the results."""
    from .report import write_report

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out, console or Console(stderr=True), progress)
    write_text(out / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    t0, c0 = time.perf_counter(), time.process_time()
    results: dict = {"config": asdict(cfg), "threads": torch.get_num_threads(), "stats": stage_stats(ctx),
                     "reference": stage_reference(ctx), "train": {}, "seeds": {}, "deepshape": {}, "compress": {},
                     "formats": {}}
    for seed in cfg.seed_list:
        for base in BASES:
            trained = stage_train(ctx, base, seed)
            results["seeds"].setdefault(str(seed), {})[base] = {"train": trained}
            if seed == cfg.seed:
                results["train"][base] = trained
                results["deepshape"][base] = stage_deepshape(ctx, base)
            else:
                results["seeds"][str(seed)][base]["code"] = stage_code(ctx, base, seed, key_of(trained))
    for variant in VARIANTS:
        upstream = results["deepshape" if "+" in variant else "train"][variant.split("+")[0]]
        results["compress"][variant] = stage_compress(ctx, variant, key_of(upstream))
        results["formats"][variant] = stage_formats(ctx, variant, key_of(upstream), upstream["accuracy"])
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time() - c0
    results["report"] = {k: str(v) for k, v in write_report(results, out).items()}
    write_text(out / "results.json", json.dumps(results, indent=1, default=float) + "\n")
    return results
