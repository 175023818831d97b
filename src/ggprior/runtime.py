"""Small helpers on modules and devices that every layer uses (imports nothing else of ggprior).

transformers' GPT-2 ``Conv1D`` is a linear layer with its weight stored (in, out); it is
recognised by name and its ``nf`` attribute, so transformers is never imported here.
"""

from __future__ import annotations

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch dict with every tensor moved to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight (in, out), y = x @ W + b; detected without importing it."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out x in, bias) of a linear-like layer."""
    if isinstance(m, nn.Linear):
        return m.weight.detach(), m.bias
    if is_conv1d(m):
        return m.weight.detach().t(), m.bias
    raise TypeError(f"not a linear layer: {type(m).__name__}")
