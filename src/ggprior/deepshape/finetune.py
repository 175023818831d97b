"""DeepShape with fine-tuning (Algorithm 1, step 4) and iterated DeepShape, through the trainer.

One round = reshape the model's weights in place (:func:`ggprior.deepshape.deepshape_`), then
fine-tune ``epochs`` epochs with :func:`ggprior.train.train`. ``rounds > 1`` repeats it (the
paper's iterated DeepShape): every round fits the weights afresh, so the targets compound
(gamma x K_gamma^r, beta x K_beta^r before fine-tuning pulls them back). Each round fine-tunes
with its own seed (``config.seed + round``) and a fresh optimizer and schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from ..tasks.data import TaskData
from ..train import Callback, TrainConfig, evaluate, train
from .model import deepshape_
from .reshape import ShapeReport


def summarize_reports(reports: Sequence[ShapeReport]) -> dict:
    """Value-weighted means over reshaped groups: fitted gamma/beta before, target, after; grid entropy."""
    n = sum(r.numel for r in reports)
    if n == 0:
        raise ValueError("summarize_reports: no reports")

    def mean(get) -> float:
        return sum(get(r) * r.numel for r in reports) / n

    return {
        "tensors": len(reports), "values": n,
        "gamma_before": mean(lambda r: r.before.gamma), "beta_before": mean(lambda r: r.before.beta),
        "gamma_target": mean(lambda r: r.target[2]), "beta_target": mean(lambda r: r.target[1]),
        "gamma_after": mean(lambda r: r.after.gamma), "beta_after": mean(lambda r: r.after.beta),
        "entropy_before": mean(lambda r: r.entropy_before), "entropy_after": mean(lambda r: r.entropy_after),
        "tail_frac": sum(r.n_low + r.n_high for r in reports) / n,
    }


def deepshape_finetune(
    model: nn.Module,
    train_data: TaskData,
    k_gamma: float,
    k_beta: float,
    *,
    epochs: int = 1,
    rounds: int = 1,
    config: TrainConfig | None = None,
    eval_data: TaskData | None = None,
    callbacks: Sequence[Callback] = (),
    **options,
) -> list[dict]:
    """Reshape ``model`` in place then fine-tune it ``epochs`` epochs; repeat ``rounds`` times.

    ``epochs=0`` reshapes only. ``options`` go to :func:`ggprior.deepshape.deepshape`
    (``select``, ``pooled``, ``tails``, ``n_min``, ``bin_width``, ...). Returns one dict per
    round: ``round``, ``reshape`` (see :func:`summarize_reports`), ``reshaped_eval`` (metrics
    right after reshaping, with ``eval_data``) and ``train`` (the trainer's metrics dict).
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    base = config or TrainConfig()
    rows = []
    for r in range(rounds):
        row: dict = {"round": r + 1, "reshape": summarize_reports(deepshape_(model, k_gamma, k_beta, **options))}
        if eval_data is not None:
            row["reshaped_eval"] = evaluate(model, eval_data, base.eval_batch_size)
        if epochs > 0:
            row["train"] = train(model, train_data, eval_data, replace(base, epochs=epochs, seed=base.seed + r),
                                 callbacks)
        rows.append(row)
    return rows
