"""ggprior in the tools people train with: ``transformers.Trainer`` callbacks and GCT for DDP runs.

- :class:`BackSlashCallback`: the BackSlash rate step (:class:`ggprior.train.BackSlash`, ``mode="step"``)
  after every optimizer step (``on_step_end``, so once per step also with gradient accumulation),
  nu re-estimated from the parameters in the same pass as in ggprior's own trainer. Works the same
  under DDP: every worker applies the identical step to identical parameters.
- :class:`ACTCallback`: ACT (:class:`ggprior.train.act.ACT`): forward hooks record the block outputs
  of each training forward pass, and a forward hook on the model adds ``lam * s(t) * R`` to the
  model output's ``loss``, so ``Trainer`` differentiates it with the task loss.
- :class:`GCTCallback` / :func:`enable_gct`: registers the GCT communication hook
  (:func:`ggprior.gct.register_gct`) on the DDP model that ``Trainer`` (via accelerate)
  built, at ``on_train_begin``; launch with ``torchrun --nproc_per_node N script.py``. Outside
  ``Trainer`` (accelerate or plain DDP): ``register_gct(ddp_model, GCTConfig(...))`` after wrapping.
- From a plain PyTorch loop: ``BackSlash(lam).on_train_begin(model, total_steps)`` once, then
  ``rate.step_(step)`` after each ``optimizer.step()`` (or :func:`ggprior.train.backslash.backslash_step_`
  on a list of tensors): one call per step.

Errors: a model without trainable matrices (BackSlash) or without transformer blocks (ACT) raises
:class:`ggprior.train.TrainError` at ``on_train_begin``; a loss or parameters that stop being finite
raise it at the step where it shows, naming the step and lambda, before ``Trainer`` saves a
checkpoint of the broken model (the last good checkpoint is kept).
"""

from __future__ import annotations

import math
import weakref

from torch import nn
from transformers import TrainerCallback

from .train.act import ACT
from .train.backslash import NU_RANGE, BackSlash
from .train.loop import TrainError


def _model(kwargs: dict, who: str) -> nn.Module:
    model = kwargs.get("model")
    if model is None:
        raise TrainError(f"{who}: the trainer passed no model to the callback")
    return model


def _check_loss(logs: dict | None, step: int, hint: str) -> None:
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise TrainError(f"loss became {float(loss)} at step {step}; {hint}")


class BackSlashCallback(TrainerCallback):
    """BackSlash (GG rate on the weights) for ``transformers.Trainer``; arguments as :class:`~ggprior.train.BackSlash`.

    ``epochs=k`` applies the rate in the first k epochs only. After training, ``nu_last`` and
    ``history`` (per epoch: mean nu, fitted nu, exact-zero fraction) describe what it did.
    """

    def __init__(self, lam: float, *, nu: float | None = None, eps: float = 1.0, per_tensor: bool = False,
                 epochs: int | None = None, params: str = "matrices", nu_range: tuple[float, float] = NU_RANGE):
        self.rate = BackSlash(lam, nu=nu, eps=eps, per_tensor=per_tensor, mode="step", epochs=epochs, params=params,
                              nu_range=nu_range)
        self.history: list[dict] = []
        self._epoch = 0

    @property
    def nu_last(self) -> list[float]:
        return self.rate.nu_last

    def on_train_begin(self, args, state, control, **kwargs):
        self.rate.on_train_begin(_model(kwargs, "BackSlashCallback"), state.max_steps)
        self._epoch = int(state.epoch or 0)
        self.rate.on_epoch_begin(None, self._epoch)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = int(round(state.epoch or 0))
        self.rate.on_epoch_begin(None, self._epoch)

    def on_step_end(self, args, state, control, **kwargs):
        if self.rate.active and self.rate.lam > 0:
            self.rate.step_(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.history.append({"epoch": self._epoch + 1, **self.rate.on_epoch_end(None, self._epoch)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        _check_loss(logs, state.global_step, self.rate.failure_hint())


class ACTCallback(TrainerCallback):
    """ACT (GG rate on the activations between blocks) for ``transformers.Trainer``; arguments as
    :class:`~ggprior.train.act.ACT`. The model must return a ``loss`` (i.e. be given labels)."""

    def __init__(self, lam: float, **act_kwargs):
        self.act = ACT(lam, **act_kwargs)
        self.lam = lam
        self.step = 1
        self.handle = None
        self.history: list[dict] = []
        self._epoch = 0

    def on_train_begin(self, args, state, control, **kwargs):
        from .stats.hooks import HookError

        model = _model(kwargs, "ACTCallback")
        try:
            self.act.on_train_begin(model, state.max_steps)
        except HookError as e:
            raise TrainError(f"ACTCallback: {e}") from e
        if self.handle is not None:
            self.handle.remove()
        self.handle = model.register_forward_hook(self._add_rate)

    def _add_rate(self, module: nn.Module, args, out):
        term = self.act.extra_loss(module, self.step)
        if term is None or getattr(out, "loss", None) is None:
            return out
        out.loss = out.loss + term
        return out

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = int(round(state.epoch or 0))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.history.append({"epoch": self._epoch + 1, **self.act.on_epoch_end(None, self._epoch)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        _check_loss(logs, state.global_step, f"ACT with lambda={self.lam:g}; lower lambda (the last checkpoint "
                    "is kept)")

    def on_train_end(self, args, state, control, **kwargs):
        self.act.remove()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class GCTCallback(TrainerCallback):
    """Registers GCT on the DDP model that ``trainer`` trains (use :func:`enable_gct`).

    In a single-process run there is nothing to exchange and the callback does nothing
    (``state`` stays None). ``state.stats`` holds the communication counts after training.
    """

    def __init__(self, trainer, config=None, *, timeout: float | None = None):
        # a weak reference: the trainer holds this callback, and a cycle would keep the DDP model (and its
        # reducer) alive until interpreter exit, after the process group is gone
        self._trainer, self.config, self.timeout = weakref.ref(trainer), config, timeout
        self.state = None
        self._registered: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        from .gct import register_gct

        wrapped = getattr(self._trainer(), "model_wrapped", None)
        if not isinstance(wrapped, DistributedDataParallel) or self._registered == id(wrapped):
            return
        self.state = register_gct(wrapped, self.config, timeout=self.timeout)
        self._registered = id(wrapped)

    def on_train_end(self, args, state, control, **kwargs):
        if self.state is not None:
            self.state.close()  # joins the coding thread before the process group and interpreter shut down


def enable_gct(trainer, config=None, *, timeout: float | None = None) -> GCTCallback:
    """Make ``trainer`` (a ``transformers.Trainer`` launched with torchrun) exchange GCT-coded gradients.

    Adds a :class:`GCTCallback` and returns it; its ``state.stats`` holds the counts after training.
    """
    cb = GCTCallback(trainer, config, timeout=timeout)
    trainer.add_callback(cb)
    return cb


__all__ = ["ACTCallback", "BackSlashCallback", "GCTCallback", "enable_gct"]
