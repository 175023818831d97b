"""A small, device-agnostic trainer with callbacks, checkpoint/resume and metrics JSON.

One loop for every experiment: AdamW (weight decay on matrices only), linear warmup then
linear decay to zero, gradient clipping, evaluation on the validation data after every epoch
(accuracy for classification, perplexity for language models), a test evaluation of the final
model, a tqdm progress bar, and ``metrics.json`` rewritten atomically each epoch.

Extensions plug in as :class:`Callback` objects, never as forks of the loop. Per step the loop
does: forward -> task loss + sum of ``extra_loss`` -> backward -> ``on_after_backward`` ->
clip -> optimizer step -> ``on_step_end``. The final model is the last epoch's (no early
stopping).

Checkpoints (``out_dir/checkpoint/``, after every epoch): ``epochN.model.safetensors`` (model,
tied weights once), ``epochN.state.safetensors`` (AdamW moments and the CPU, data-order and
CUDA random states) and ``latest.json`` (epoch, step, history, optimizer hyper-parameters,
callback states), written last and atomically so a crash never pairs files from different
epochs. ``resume=True`` continues from it; on CPU a resumed run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from ..io.atomic import atomic_path, write_text
from ..runtime import device_of, to_device
from ..tasks.data import TaskData, batches


class TrainError(ValueError):
    """Bad trainer settings or an unusable checkpoint."""


@dataclass
class TrainConfig:
    """Trainer settings. ``warmup`` is a fraction of all steps; ``device`` any torch device string."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_batch_size: int = 128
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise TrainError(f"epochs and batch sizes must be positive: {self}")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and self.weight_decay >= 0):
            raise TrainError(f"need lr > 0, 0 <= warmup < 1, weight_decay >= 0: {self}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainError(f"grad_clip must be positive or None, got {self.grad_clip}")


class Callback:
    """Hooks the loop calls; override the ones you need.

    ``extra_loss`` returns a differentiable term added to the loss (or None);
    ``on_epoch_end`` returns metrics merged into that epoch's history row; ``state_dict``
    must be JSON-serialisable and is restored with ``load_state_dict`` on resume.
    """

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once before the first step (also when resuming)."""

    def on_epoch_begin(self, model: nn.Module, epoch: int) -> None:
        """Called before each epoch's first step (epochs count from 0)."""

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """A term to add to this step's loss, or None."""
        return None

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        """Called with gradients in place, before clipping and the optimizer step."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step (``step`` counts from 1)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict:
        """Metrics for this epoch's history row."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 128) -> dict[str, float]:
    """Loss plus accuracy (classification) or perplexity (LM) of ``model`` on ``data``.

    The loss is averaged over examples (classification) or predicted tokens (LM).
    """
    if len(data) == 0:
        raise TrainError(f"{data.name}/{data.split}: no examples to evaluate")
    was_training = model.training
    model.eval()
    device = device_of(model)
    total, count, correct = 0.0, 0, 0
    for batch in batches(data, batch_size):
        batch = to_device(batch, device)
        out = model(**batch)
        if data.kind == "lm":
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:
            n = batch["labels"].numel()
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    loss = total / count
    if data.kind == "lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return {"loss": loss, "accuracy": correct / count}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate before step ``step`` (0-based): linear warmup, then linear decay to 0."""
    warm = int(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def _save_checkpoint(folder: Path, epoch: int, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                     gen: torch.Generator, history: list, callbacks: Sequence[Callback], cfg: TrainConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"epoch{epoch}"
    with atomic_path(folder / f"{stem}.model.safetensors") as tmp:
        save_model(model, str(tmp))
    opt_sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().contiguous() for i, st in opt_sd["state"].items() for k, v in st.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_path(folder / f"{stem}.state.safetensors") as tmp:
        save_file(tensors, str(tmp))
    latest = {
        "epoch": epoch, "step": step, "history": history, "config": asdict(cfg),
        "param_groups": opt_sd["param_groups"], "callbacks": [cb.state_dict() for cb in callbacks],
    }
    write_text(folder / "latest.json", json.dumps(latest, indent=1) + "\n")
    for old in folder.glob("epoch*.safetensors"):
        if not old.name.startswith(stem + "."):
            old.unlink()


def _load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     callbacks: Sequence[Callback], cfg: TrainConfig) -> tuple[int, int, list]:
    latest = json.loads((folder / "latest.json").read_text())
    for key in ("batch_size", "seed", "epochs", "lr", "warmup"):
        if latest["config"].get(key) != getattr(cfg, key):
            raise TrainError(f"{folder}: checkpoint was made with {key}={latest['config'].get(key)!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    if len(latest["callbacks"]) != len(callbacks):
        raise TrainError(f"{folder}: checkpoint has {len(latest['callbacks'])} callback states, "
                         f"this run {len(callbacks)} callbacks")
    stem = f"epoch{latest['epoch']}"
    load_model(model, str(folder / f"{stem}.model.safetensors"), strict=True)
    tensors = load_file(str(folder / f"{stem}.state.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": latest["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    gen.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for cb, st in zip(callbacks, latest["callbacks"], strict=True):
        cb.load_state_dict(st)
    return latest["epoch"] + 1, latest["step"], latest["history"]


def train(
    model: nn.Module, train_data: TaskData, eval_data: TaskData | None = None, config: TrainConfig | None = None,
    callbacks: Sequence[Callback] = (), *, out_dir: str | Path | None = None, resume: bool = False,
    test_data: TaskData | None = None,
) -> dict:
    """Train ``model`` in place on ``train_data``; returns the metrics dict (also ``metrics.json``).

    The dict holds ``config``, ``history`` (one row per epoch: train loss, extra loss, lr,
    seconds, ``validation_*`` metrics, callback metrics), ``steps``, ``seconds`` and, with
    ``test_data``, ``test`` metrics of the final model. ``out_dir`` enables checkpoints and
    ``resume``.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    if len(train_data) == 0:
        raise TrainError(f"{train_data.name}/{train_data.split}: no training examples")
    if resume and out_dir is None:
        raise TrainError("resume needs out_dir (where the checkpoint is)")
    device = torch.device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoint" if out is not None else None
    start_epoch, step, history = 0, 0, []
    if resume and ckpt is not None and (ckpt / "latest.json").is_file():
        start_epoch, step, history = _load_checkpoint(ckpt, model, opt, gen, callbacks, cfg)
    for cb in callbacks:
        cb.on_train_begin(model, total)
    result = {"config": asdict(cfg), "task": train_data.name, "train_size": len(train_data), "history": history}
    t_start = time.perf_counter() - sum(row["seconds"] for row in history)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        for cb in callbacks:
            cb.on_epoch_begin(model, epoch)
        t0 = time.perf_counter()
        sum_loss, sum_extra = 0.0, 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        for batch in batches(train_data, cfg.batch_size, shuffle=True, generator=gen):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = model(**to_device(batch, device)).loss
            extras = [x for x in (cb.extra_loss(model, step + 1) for cb in callbacks) if x is not None]
            full = loss + sum(extras) if extras else loss
            if not torch.isfinite(full):
                hints = [cb.failure_hint() for cb in callbacks if hasattr(cb, "failure_hint")]
                raise TrainError(f"loss became {float(full.detach())} at step {step + 1} (epoch {epoch + 1})"
                                 + "".join(f"; {h}" for h in hints))
            opt.zero_grad(set_to_none=True)
            full.backward()
            step += 1
            for cb in callbacks:
                cb.on_after_backward(model, step)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            for cb in callbacks:
                cb.on_step_end(model, step)
            loss_value = float(loss.detach())
            sum_loss += loss_value
            sum_extra += float(full.detach()) - loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        bar.close()
        row = {"epoch": epoch + 1, "step": step, "train_loss": sum_loss / steps_per_epoch,
               "extra_loss": sum_extra / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if eval_data is not None:
            row.update({f"validation_{k}": v for k, v in evaluate(model, eval_data, cfg.eval_batch_size).items()})
        for cb in callbacks:
            row.update(cb.on_epoch_end(model, epoch))
        history.append(row)
        if ckpt is not None:
            _save_checkpoint(ckpt, epoch, step, model, opt, gen, history, callbacks, cfg)
        result.update(steps=step, seconds=time.perf_counter() - t_start)
        if out is not None:
            write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    result.update(steps=step, seconds=time.perf_counter() - t_start)
    if test_data is not None:
        result["test"] = evaluate(model, test_data, cfg.eval_batch_size)
    if out is not None:
        write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result
