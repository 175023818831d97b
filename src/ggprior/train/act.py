"""ACT: activation-constrained training -- a GG rate penalty on the activations passed between blocks.

Design (ours; SPEC.md section 7 gives only the abstract), in the spirit of BackSlash:

- What is constrained: the hidden state each transformer block hands to the next (the output of
  block l, l = 0..L-1, found by :func:`ggprior.stats.transformer_blocks`), at non-padding
  positions only (the model's ``attention_mask`` is read by a forward pre-hook).
- Rate: the GG rate surrogate of BackSlash on those values, per block
  R_l = mean (|a| + eps)^nu_l, nu_l re-estimated every step from the block's (detached) activations
  by the moment ratio (:func:`ggprior.train.backslash.estimate_nu`, clamped to [0.1, 3]).
- Progressive: the penalty ramps up by layer and by schedule,
  J = D + lam * s(t) * sum_l w_l R_l / sum_l w_l,  w_l = ((l + 1) / L)^``layer_power`` (deeper
  blocks, whose outputs are the ones passed on most, are pushed hardest; 0 gives equal weights)
  and s(t) = min(1, t / (``ramp`` * total steps)) (plain training first, then the constraint
  grows).
- Differentiated through the network (an ``extra_loss``): unlike weights, activations cannot be
  shrunk by a direct update.

Measurement (:func:`activation_bits`): every block output on an evaluation set, at non-padding
positions, quantized with one fixed absolute step (default ``STEP`` = 2^-4; LayerNorm'd hidden
states have unit scale per token), coded with rANS under each block's own histogram (the real
stream length from ``ggprior.codec``), the empirical entropy, and the fraction of values that
quantize to zero. :func:`quantized_activations` evaluates a model whose block outputs are replaced
by their quantized values, so the bits are shown to be enough for the task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..codec import registry
from ..codec.histogram import histogram
from ..codec.quantizer import check_step
from ..runtime import device_of
from ..stats.hooks import first_tensor, masked, transformer_blocks
from ..tasks.data import TaskData, batches
from .backslash import NU_RANGE, estimate_nu
from .loop import Callback, TrainError, evaluate

STEP = 2.0**-4


class ACT(Callback):
    """Activation-constrained training as a trainer callback (see the module docstring)."""

    def __init__(self, lam: float, *, eps: float = 0.1, ramp: float = 0.3, layer_power: float = 1.0,
                 nu: float | None = None, nu_range: tuple[float, float] = NU_RANGE):
        if not lam >= 0:
            raise TrainError(f"ACT lambda must be >= 0, got {lam}")
        if not eps > 0:
            raise TrainError(f"ACT eps must be > 0 (the rate's gradient is infinite at 0 for nu < 1), got {eps}")
        if not 0 <= ramp <= 1 or layer_power < 0:
            raise TrainError(f"ACT needs 0 <= ramp <= 1 and layer_power >= 0, got {ramp}, {layer_power}")
        if nu is not None and not nu > 0:
            raise TrainError(f"fixed nu must be positive, got {nu}")
        self.lam, self.eps, self.ramp, self.layer_power = lam, eps, ramp, layer_power
        self.fixed_nu, self.nu_range = nu, nu_range
        self.total = 1
        self.handles: list = []
        self.mask: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        self.weights: list[float] = []
        self._sums = {"rate": 0.0, "nu": 0.0, "n": 0}

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.remove()
        blocks = transformer_blocks(model)
        n = len(blocks)
        self.weights = [((i + 1) / n) ** self.layer_power for i in range(n)]
        self.total = max(1, total_steps)

        def pre(mod, args, kwargs):
            self.mask = kwargs.get("attention_mask")

        self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        for i, (_, block) in enumerate(blocks):
            def hook(mod, args, out, i=i):
                t = first_tensor(out)
                if mod.training and torch.is_grad_enabled() and t is not None:
                    self.outputs[i] = masked(t, self.mask)
            self.handles.append(block.register_forward_hook(hook))

    def remove(self) -> None:
        """Detach the hooks (call after training; outside training mode they record nothing)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def scale(self, step: int) -> float:
        """lam * s(t): the schedule ramp at ``step`` (1-based)."""
        if self.ramp == 0:
            return self.lam
        return self.lam * min(1.0, step / (self.ramp * self.total))

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        outs, self.outputs = self.outputs, {}
        lam = self.scale(step)
        if lam == 0 or not outs:
            return None
        idx = sorted(outs)
        tensors = [outs[i] for i in idx]
        nus = (np.full(len(idx), float(self.fixed_nu)) if self.fixed_nu is not None
               else estimate_nu(tensors, per_tensor=True, nu_range=self.nu_range))
        w = [self.weights[i] for i in idx]
        rates = [(t.abs() + self.eps).pow(float(v)).mean() for t, v in zip(tensors, nus, strict=True)]
        total = sum(wi * r for wi, r in zip(w, rates, strict=True)) / sum(w)
        self._sums["rate"] += float(total.detach())
        self._sums["nu"] += float(np.average(nus, weights=w))
        self._sums["n"] += 1
        return lam * total

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict:
        n = max(self._sums["n"], 1)
        out = {"act_rate_mean": self._sums["rate"] / n, "act_nu_mean": self._sums["nu"] / n}
        self._sums = {"rate": 0.0, "nu": 0.0, "n": 0}
        return out


@contextmanager
def _block_outputs(model: nn.Module, transform=None) -> Iterator[tuple[dict, list]]:
    """Forward hooks on every block: record (masked) outputs, optionally replace them by ``transform(out)``."""
    state: dict = {"mask": None}
    seen: list[tuple[int, torch.Tensor]] = []
    handles = [model.register_forward_pre_hook(lambda m, a, kw: state.update(mask=kw.get("attention_mask")),
                                               with_kwargs=True)]
    for i, (_, block) in enumerate(transformer_blocks(model)):
        def hook(mod, args, out, i=i):
            t = first_tensor(out)
            if t is None:
                return None
            if transform is not None:
                t = transform(t)
                out = (t, *out[1:]) if isinstance(out, tuple) else t
            seen.append((i, masked(t, state["mask"]).detach()))
            return out
        handles.append(block.register_forward_hook(hook))
    try:
        yield state, seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_bits(model: nn.Module, data: TaskData, step: float = STEP, batch_size: int = 128,
                    coder: str = "ans-hist") -> dict:
    """Coded bits per token of the inter-block activations of ``model`` on ``data`` at ``step``.

    Returns ``bits_per_token`` (all block outputs of a token together, coded with ``coder`` per
    block), ``entropy_bits_per_token`` (the empirical entropy), ``fp32_bits_per_token``,
    ``zero_frac`` (values quantized to 0, i.e. |a| <= step / 2), ``rms`` of the activations (a
    smaller scale alone also lowers the bits at a fixed step) and per-block rows.
    """
    step = check_step(step, "activation step")
    was = model.training
    model.eval()
    device = device_of(model)
    per_block: dict[int, list[np.ndarray]] = {}
    tokens, sq = 0, 0.0
    try:
        with _block_outputs(model) as (_, seen):
            for batch in batches(data, batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                seen.clear()
                model(**batch)
                tokens += int(batch["attention_mask"].sum())
                for i, t in seen:
                    sq += float(t.double().square().sum())
                    q = torch.round(t.float() / step).to(torch.int64)
                    per_block.setdefault(i, []).append(q.reshape(-1).cpu().numpy())
    finally:
        model.train(was)
    if not per_block or tokens == 0:
        raise TrainError(f"{data.name}/{data.split}: no block outputs seen")
    rows, coded, entropy, values, zeros = [], 0.0, 0.0, 0, 0
    for i in sorted(per_block):
        q = np.concatenate(per_block[i])
        h = histogram(q)
        stream, _ = registry.encode(coder, q)
        z = int(h.counts[h.symbols == 0].sum())
        rows.append({"block": i, "values": int(q.size), "bits_per_value": 8 * len(stream) / q.size,
                     "entropy_bits_per_value": h.entropy_bits() / q.size, "zero_frac": z / q.size})
        coded += 8 * len(stream)
        entropy += h.entropy_bits()
        values += q.size
        zeros += z
    return {"step": step, "coder": coder, "tokens": tokens, "blocks": len(rows),
            "bits_per_token": coded / tokens, "entropy_bits_per_token": entropy / tokens,
            "fp32_bits_per_token": 32.0 * values / tokens, "zero_frac": zeros / values,
            "rms": (sq / values) ** 0.5, "per_block": rows}


@torch.no_grad()
def quantized_activations(model: nn.Module, data: TaskData, step: float = STEP, batch_size: int = 128) -> dict:
    """:func:`~ggprior.train.evaluate` with every block output replaced by round(a / step) * step."""
    step = check_step(step, "activation step")
    with _block_outputs(model, lambda t: torch.round(t / step) * step):
        return evaluate(model, data, batch_size)
