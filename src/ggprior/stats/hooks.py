"""Hooks that collect GG statistics of a model's activations and gradients, layer by layer.

Activations: forward hooks on every linear layer (``nn.Linear`` and transformers' ``Conv1D``),
on every transformer block (the hidden state passed to the next block, group ``block``) and
on the embedding layers. Padding positions are left out: set :attr:`StatsCollector.mask`
to the batch's attention mask before the forward pass (the runners below do).

Gradients: post-accumulate-grad hooks on every parameter (tied parameters once): the
per-batch parameter gradient, which is what data-parallel training communicates.

Fits are exact moment-ratio fits (:class:`ggprior.gg.MomentAccumulator`, float64 sums)
over every value seen, in two passes over the same data: pass 1 accumulates counts and sums,
pass 2 the centred moments around the pass-1 mean. The runners
(:func:`activation_statistics`, :func:`gradient_statistics`) replay the batches; gradients
are replayed under the same random state, so dropout masks repeat and pass 2 sees the very
values pass 1 saw. Pass 2 also keeps a bounded, seeded subsample of every key (at most
``max_samples`` values, drawn in proportion to each chunk's size, which pass 1 made known)
for goodness of fit against the Gaussian and Laplacian and for the plots.

Every key also feeds its group pool (``group:<g>``, g from :func:`ggprior.stats.tensor_group`
or ``block``) and the kind's pool (``__activations__`` / ``__gradients__``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import gg
from ..runtime import device_of, is_linear
from .tensors import tensor_group

KINDS = ("activations", "gradients")
POOL = {"activations": "__activations__", "gradients": "__gradients__"}
BLOCK_GROUP = "block"

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


class HookError(ValueError):
    """A model or data the statistics hooks cannot work with."""


@dataclass
class _Key:
    acc: gg.MomentAccumulator
    group: str
    kind: str
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks, in order: the largest ``nn.ModuleList`` of same-type modules.

    BERT: ``*.encoder.layer``; GPT-2: ``transformer.h``; LLaMA: ``model.layers``.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise HookError(f"{type(model).__name__}: no transformer blocks found (no ModuleList of layers)")
    _, prefix, blocks = best
    return [(f"{prefix}.{i}", m) for i, m in enumerate(blocks)]


def first_tensor(out: object) -> torch.Tensor | None:
    """A module's main output: the tensor itself, or the first tensor of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (batch, seq, ...) at the non-padding positions of ``mask`` (batch, seq)."""
    if mask is None or x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(device=x.device, dtype=torch.bool)]


class StatsCollector:
    """Two-pass GG moment sums and bounded samples per key, plus group and kind pools."""

    def __init__(self, max_samples: int = 1 << 16, seed: int = 0):
        if max_samples < 0:
            raise HookError(f"max_samples must be >= 0, got {max_samples}")
        self.max_samples = max_samples
        self.keys: dict[str, _Key] = {}
        self.pass_index = 1
        self.mask: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def _key(self, key: str, group: str, kind: str) -> _Key:
        k = self.keys.get(key)
        if k is None:
            if self.pass_index != 1:
                raise HookError(f"{key}: first seen in pass 2; both passes must see the same data")
            k = self.keys[key] = _Key(gg.MomentAccumulator(key), group, kind)
        return k

    def add(self, key: str, x: torch.Tensor, group: str, kind: str) -> None:
        """Add values of ``key`` (and of its group and kind pools) to the current pass."""
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        for name, g in ((key, group), (f"group:{kind}:{group}", group), (POOL[kind], "all")):
            k = self._key(name, g, kind)
            if self.pass_index == 1:
                k.acc.add(x)
            else:
                k.acc.add_centered(x)
                self._sample(k, x)

    def _sample(self, k: _Key, x: torch.Tensor) -> None:
        want = min(x.numel(), math.ceil(self.max_samples * x.numel() / k.acc.n))
        want = min(want, self.max_samples - k.sampled)
        if want <= 0:
            return
        if want == x.numel():
            picked = x
        else:
            idx = torch.randint(0, x.numel(), (want,), generator=self._gen)
            picked = x[idx.to(x.device)]
        k.sample.append(picked.to("cpu", torch.float64))
        k.sampled += want

    def next_pass(self) -> None:
        """Switch from pass 1 (sums) to pass 2 (centred moments and samples)."""
        if self.pass_index != 1:
            raise HookError("already in pass 2")
        if not self.keys:
            raise HookError("pass 1 saw no values (no hooked module ran, or no gradients were computed)")
        self.pass_index = 2

    def samples(self, key: str) -> torch.Tensor:
        """The goodness-of-fit sample of ``key`` (float64, CPU)."""
        k = self.keys[key]
        return torch.cat(k.sample) if k.sample else torch.zeros(0, dtype=torch.float64)

    def rows(self, *, gof: bool = True, mle: bool = False) -> list[dict]:
        """One row per key: pools first, then keys in the order first seen.

        ``mle`` adds a maximum-likelihood refit on the sample (``mu_mle`` (the median), ``gamma_mle``,
        ``beta_mle``, ``loglik_gg_mle``): the moment estimate is poor for heavy tails (gamma < 0.5).
        """
        if self.pass_index != 2:
            raise HookError("rows() needs both passes (call next_pass() and replay the data)")
        names = sorted(self.keys, key=lambda n: (not n.startswith("__"), not n.startswith("group:")))
        out = []
        for name in names:
            k = self.keys[name]
            row = {"name": name, "kind": k.kind, "group": k.group, "numel": k.acc.n}
            try:
                fit = k.acc.fit()
            except (ValueError, RuntimeError) as e:
                out.append({**row, "note": str(e)})
                continue
            row.update(mu=fit.mu, beta=fit.beta, gamma=fit.gamma, std=fit.std, gamma_at_bound=fit.at_bound,
                       entropy_bits=fit.entropy_bits)
            values = self.samples(name)
            if gof and values.numel() > 1 and float(values.std()) > 0:
                row.update(gg.goodness_of_fit(values, fit).to_dict())
                if mle:  # refined on the sample, so the count must be the sample's
                    ref = gg.refine_mle(values, replace(fit, n=values.numel()), name=name)
                    row.update(mu_mle=ref.mu, gamma_mle=ref.gamma, beta_mle=ref.beta,
                               loglik_gg_mle=gg.mean_loglik(values, ref.mu, ref.beta, ref.gamma))
                row["best_law"] = best_law(row)
            out.append(row)
        return out


def best_law(row: dict) -> str:
    """The law (gg, gauss, laplace) of highest mean log-likelihood in a row with goodness-of-fit fields."""
    lls = {"gg": max(row["loglik_gg"], row.get("loglik_gg_mle", -math.inf)),
           "gauss": row["loglik_gauss"], "laplace": row["loglik_laplace"]}
    return max(lls, key=lls.get)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, group) of every module whose output is recorded as an activation."""
    blocks = {id(m) for _, m in transformer_blocks(model)}
    out = []
    for name, module in model.named_modules():
        if id(module) in blocks:
            out.append((name, module, BLOCK_GROUP))
        elif is_linear(module) or isinstance(module, nn.Embedding):
            out.append((name, module, tensor_group(name)))
    return out


def attach_activation_hooks(model: nn.Module, collector: StatsCollector) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks recording every activation module's output into ``collector``."""
    handles = []
    for name, module, group in activation_modules(model):
        def hook(mod, args, out, name=name, group=group):
            t = first_tensor(out)
            if t is not None and torch.is_floating_point(t):
                collector.add(name, masked(t, collector.mask), group, "activations")
        handles.append(module.register_forward_hook(hook))
    return handles


def attach_gradient_hooks(model: nn.Module, collector: StatsCollector) -> list[torch.utils.hooks.RemovableHandle]:
    """Post-accumulate-grad hooks recording every trainable parameter's gradient into ``collector``."""
    handles = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        def hook(param, name=name):
            if param.grad is not None:
                collector.add(name, param.grad, tensor_group(name), "gradients")
        handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def _remove(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> None:
    for h in handles:
        h.remove()


def _run_passes(model: nn.Module, batches: Batches, collector: StatsCollector, step: Callable[[dict], None],
                desc: str, progress: bool) -> None:
    device = device_of(model)
    for p in (1, 2):
        if p == 2:
            collector.next_pass()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            seen = 0
            for batch in tqdm(batches(), desc=f"{desc} (pass {p}/2)", disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                collector.mask = batch.get("attention_mask")
                step(batch)
                seen += 1
        if seen == 0:
            raise HookError(f"{desc}: no batches to run")
    collector.mask = None


def _pool_samples(collector: StatsCollector, samples: dict[str, torch.Tensor] | None) -> None:
    if samples is not None:
        samples.update({k: collector.samples(k) for k in collector.keys if k.startswith(("__", "group:"))})


def activation_statistics(model: nn.Module, batches: Batches, *, max_samples: int = 1 << 16, seed: int = 0,
                          mle: bool = False, progress: bool = True,
                          samples: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """GG rows of every activation of ``model`` over ``batches()`` (eval mode, no gradients).

    ``batches`` is a zero-argument callable returning a fresh iterable of model-input dicts
    (called twice). The model's train/eval mode is restored afterwards. ``samples``, if given,
    receives the goodness-of-fit sample of every pooled row (kind and group pools).
    """
    collector = StatsCollector(max_samples, seed)
    handles = attach_activation_hooks(model, collector)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run_passes(model, batches, collector, lambda b: model(**b), "activations", progress)
    finally:
        _remove(handles)
        model.train(was_training)
    _pool_samples(collector, samples)
    return collector.rows(mle=mle)


def gradient_statistics(model: nn.Module, batches: Batches, *, max_samples: int = 1 << 16, seed: int = 0,
                        mle: bool = False, progress: bool = True,
                        samples: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """GG rows of every parameter's per-batch gradient over ``batches()`` (train mode, no update).

    Each batch's loss (``model(**batch).loss``) is back-propagated from zeroed gradients; the
    parameters are not changed and gradients are cleared afterwards. Both passes run under
    the same random state, so dropout masks repeat. ``samples`` as in :func:`activation_statistics`.
    """
    collector = StatsCollector(max_samples, seed)
    handles = attach_gradient_hooks(model, collector)
    was_training = model.training
    model.train()

    def step(batch: dict) -> None:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        if loss is None:
            raise HookError("gradient statistics need batches with labels (the model returned no loss)")
        loss.backward()

    try:
        _run_passes(model, batches, collector, step, "gradients", progress)
    finally:
        _remove(handles)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    _pool_samples(collector, samples)
    return collector.rows(mle=mle)


def tensor_rows(named: Iterable[tuple[str, torch.Tensor]], kind: str, *, max_samples: int = 1 << 16,
                seed: int = 0, gof: bool = True) -> list[dict]:
    """GG rows of tensors already in memory (e.g. one step's gradients), with group and kind pools."""
    if kind not in KINDS:
        raise HookError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    items = [(n, t) for n, t in named if t is not None]
    collector = StatsCollector(max_samples, seed)
    for p in (1, 2):
        if p == 2:
            collector.next_pass()
        for name, t in items:
            collector.add(name, t, tensor_group(name), kind)
    return collector.rows(gof=gof)


def iter_named_grads(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, gradient) of every parameter that has one."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            yield name, p.grad
