"""Trainer callback: GG statistics of the gradients during training (:class:`GradientSnapshots`)."""

from __future__ import annotations

from torch import nn

from ..stats.hooks import HookError, iter_named_grads, tensor_rows
from .loop import Callback


class GradientSnapshots(Callback):
    """Trainer callback: GG rows of the pooled gradients (kind and group pools) every ``every`` steps.

    Taken in ``on_after_backward``, i.e. on each step's raw gradients before clipping. The rows
    (with ``step`` added) accumulate in :attr:`rows`.
    """

    def __init__(self, every: int, *, max_samples: int = 1 << 14):
        if every < 1:
            raise HookError(f"every must be >= 1, got {every}")
        self.every, self.max_samples = every, max_samples
        self.rows: list[dict] = []

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        if step % self.every == 1 % self.every:
            rows = tensor_rows(iter_named_grads(model), "gradients", max_samples=self.max_samples, seed=step)
            self.rows.extend({"step": step, **r} for r in rows if r["name"].startswith(("__", "group:")))
