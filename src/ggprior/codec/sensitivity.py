"""Sensitivity weights of a model's parameters from a few calibration batches: how much the output (loss) moves
per unit squared weight error, the ``w_j`` of :mod:`.allocate`'s weighted distortion."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .allocate import AllocationError


def sensitivity_weights(
    model: nn.Module,
    batches: Iterable,
    *,
    kind: str = "grad2",
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    names: Iterable[str] | None = None,
    per_row: bool = False,
) -> dict[str, float | np.ndarray]:
    """Per-tensor sensitivity weights of a model's parameters from a few calibration batches.

    ``kind="grad2"``: mean squared gradient of the loss per element (a diagonal Fisher /
    Hessian proxy: the loss grows by about ``1/2 sum_i F_i e_i^2`` for weight errors ``e``);
    ``loss_fn(model, batch)`` gives the loss (default: ``model(**batch).loss`` for dict batches
    with labels, else ``model(batch).loss``). With ``per_row`` the mean over each row of 2-D
    tensors is returned (an array). ``kind="act"``: for every ``nn.Linear`` weight, the mean
    squared input activation (forward hooks), i.e. the output error power per unit weight error.
    Returns name -> weight (float, or array per row).
    """
    want = set(names) if names is not None else None
    params = {k: p for k, p in model.named_parameters() if p.is_floating_point() and (want is None or k in want)}
    if kind == "grad2":
        acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        nb = 0
        was = model.training
        model.eval()
        for b in batches:
            model.zero_grad(set_to_none=True)
            if loss_fn is not None:
                loss = loss_fn(model, b)
            else:
                out = model(**b) if isinstance(b, Mapping) else model(b)
                loss = out.loss if hasattr(out, "loss") else out
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    acc[k] += p.grad.detach().to(torch.float64) ** 2
            nb += 1
        model.zero_grad(set_to_none=True)
        model.train(was)
        if nb == 0:
            raise AllocationError("sensitivity_weights: no calibration batches")
        out = {}
        for k, a in acc.items():
            a = a / nb
            out[k] = a.mean(dim=1).numpy() if per_row and a.dim() == 2 else float(a.mean())
        return out
    if kind == "act":
        power: dict[str, list] = {}
        hooks = []
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                key = f"{mname}.weight" if mname else "weight"
                if want is not None and key not in want:
                    continue

                def hook(_m, inp, _o, key=key):
                    x = inp[0].detach().to(torch.float64)
                    s = power.setdefault(key, [0.0, 0])
                    s[0] += float((x * x).sum())
                    s[1] += x.numel()

                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for b in batches:
                    model(**b) if isinstance(b, Mapping) else model(b)
        finally:
            for h in hooks:
                h.remove()
        return {k: v[0] / max(v[1], 1) for k, v in power.items()}
    raise AllocationError(f"sensitivity kind must be 'grad2' or 'act', got {kind!r}")
