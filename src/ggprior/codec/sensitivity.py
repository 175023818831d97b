"""Sensitivity weights of a model's parameters from a few calibration batches: how much the output (loss) moves
per unit squared weight error, the ``w_j`` of :mod:`.allocate`'s weighted distortion; and the same for a Hugging
Face model folder on calibration text (:func:`calibration_weights`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .allocate import AllocationError
from .channels import ChannelScales, scaled_weights


def sensitivity_weights(
    model: nn.Module,
    batches: Iterable,
    *,
    kind: str = "grad2",
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    names: Iterable[str] | None = None,
    per_row: bool = False,
    per_channel: bool = False,
    seed: int = 0,
) -> dict[str, float | np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Per-tensor sensitivity weights of a model's parameters from a few calibration batches.

    ``kind="fisher"``: the diagonal Fisher information of the model's own output distribution, the
    Hessian of the KL divergence from the original model, so ``1/2 sum_i F_i e_i^2`` is the KL a weight
    error ``e`` costs. Needs no labels: outputs with ``.logits`` are read as categorical (each position's
    label drawn from the model's softmax, padding masked by the batch's ``attention_mask``), any other
    output (``last_hidden_state``, a tensor) as a unit Gaussian around it. Labels drawn independently per
    position make the squared gradient of their sum an unbiased estimate of the per-position Fisher sum.
    ``kind="grad2"``: mean squared gradient of a loss per element (the empirical Fisher);
    ``loss_fn(model, batch)`` gives the loss (default: ``model(**batch).loss`` for dict batches
    with labels, else ``model(batch).loss``). With ``per_row`` the mean over each row of 2-D
    tensors is returned (an array); with ``per_channel``, for tensors of 2+ dimensions, the means over each
    row and over each column (dim 0 by the rest flattened) as a pair of arrays, the input of
    :func:`ggprior.codec.channels.channel_scales` (their mean is the tensor's weight).
    ``kind="act"``: for every ``nn.Linear`` weight, the mean squared input activation (forward hooks), i.e. the output error power per unit weight error.
    Returns name -> weight (float, or array per row). ``seed`` seeds the Fisher's draws.
    """
    want = set(names) if names is not None else None
    params = {k: p for k, p in model.named_parameters() if p.is_floating_point() and (want is None or k in want)}
    if kind == "fisher":
        if loss_fn is not None:
            raise AllocationError("kind='fisher' builds its loss from the model's output; loss_fn is for kind='grad2'")
        gens: dict[torch.device, torch.Generator] = {}

        def fisher(m: nn.Module, b: object) -> torch.Tensor:
            return _fisher_loss(_forward(m, b), b, gens, seed)

        loss_fn, kind = fisher, "grad2"
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
                out = _forward(model, b)
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
            if per_channel and a.dim() >= 2:
                a2 = a.reshape(a.shape[0], -1)
                out[k] = (a2.mean(dim=1).numpy(), a2.mean(dim=0).numpy())
            else:
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
                    _forward(model, b)
        finally:
            for h in hooks:
                h.remove()
        return {k: v[0] / max(v[1], 1) for k, v in power.items()}
    raise AllocationError(f"sensitivity kind must be 'fisher', 'grad2' or 'act', got {kind!r}")


def _forward(model: nn.Module, batch: object) -> object:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _fisher_loss(out: object, batch: object, gens: dict, seed: int) -> torch.Tensor:
    """A loss whose squared gradient estimates the Fisher of the output: sampled labels, or a Gaussian probe."""
    logits = getattr(out, "logits", None)
    y = logits if logits is not None else getattr(out, "last_hidden_state", None)
    if y is None:
        y = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise AllocationError(f"kind='fisher' needs logits or a floating output; the model returned {type(out).__name__}")
    gen = gens.get(y.device)
    if gen is None:
        gen = gens[y.device] = torch.Generator(device=y.device).manual_seed(seed)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if logits is not None:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=gen)[:, 0]
        per = nn.functional.cross_entropy(flat, labels, reduction="none").reshape(logits.shape[:-1])
    else:
        probe = torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32)
        per = (y.float() * probe).reshape(*y.shape[:2], -1).sum(-1) if y.dim() > 2 else (y.float() * probe).sum(-1)
    if mask is not None and mask.shape == per.shape:
        per = per * mask.to(per.dtype)
    return per.sum()



CALIBRATION_TOKENS = 4096
"""Default calibration text per model for :func:`calibration_weights` (16 blocks of 256 tokens)."""
CALIBRATION_BLOCK = 256


def calibration_weights(
    folder: str | os.PathLike,
    texts: Iterable[str],
    *,
    tokens: int = CALIBRATION_TOKENS,
    block: int = CALIBRATION_BLOCK,
    device: str | torch.device | None = None,
    progress: bool = False,
    channels: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, ChannelScales]]:
    """Fisher sensitivity weights (``kind="fisher"``) of a Hugging Face model folder's tensors on text.

    The model is built in float32 from the folder's config (its ``architectures`` class, else
    ``AutoModel``) and weights, with its tokenizer; ``texts`` are cut into blocks of ``block`` tokens,
    ``tokens`` in all. Returns a weight per floating tensor name of the folder's weight files (a tensor
    the model does not hold, or one no calibration gradient reaches, gets the median weight).
    ``device``: default CUDA when available. Raises AllocationError naming the folder when the model or
    its tokenizer cannot be built or the text is empty.

    ``channels=True`` also returns channel scales (:mod:`ggprior.codec.channels`) for every matched tensor of
    2+ dimensions large enough to pay for them (:func:`~ggprior.codec.channels.worth_scaling`):
    ``(weights, scales)``, the weights of those tensors then being those of the scaled tensors
    (:func:`~ggprior.codec.channels.weight_factor`), as ``save_compressed(weights=, channel_scales=)`` takes them.
    """
    from ..io import open_source
    from ..io.sources import floating_names

    path = Path(folder)
    model, tok = _load_for_calibration(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    limit = [getattr(model.config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)]
    block = int(min([block] + [v for v in limit if isinstance(v, int) and 8 <= v < 1 << 20]))
    batches = _text_blocks(tok, texts, tokens, block, dev)
    if not batches:
        raise AllocationError(f"{path}: the calibration text gives no tokens")
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"calibration ({len(batches)} blocks of {block} tokens)", unit="block")
    try:
        got = sensitivity_weights(model, batches, kind="fisher", per_channel=channels)
    except (ValueError, TypeError, RuntimeError, IndexError) as e:  # e.g. an encoder-decoder wanting decoder inputs
        raise AllocationError(f"{path}: running the {type(model).__name__} on calibration text failed "
                              f"({_first_line(e)}); pass --calibration none") from e
    first = {id(p): k for k, p in model.named_parameters()}  # tied parameters share one weight
    params = {k: got.get(first[id(p)], np.nan) for k, p in model.named_parameters(remove_duplicate=False)}
    out, fisher, src = {}, {}, open_source(path)
    names = floating_names(src)
    for name in names:
        hits = [k for k in params if k == name or k.endswith("." + name) or name.endswith("." + k)]
        v = params[hits[0]] if len(hits) == 1 else np.nan
        w = float(np.mean(v[0])) if isinstance(v, tuple) else float(v)
        if not (np.isfinite(w) and w > 0):
            continue
        out[name] = w
        shape = tuple(src.shape(name))
        if isinstance(v, tuple) and len(shape) >= 2 and (v[0].size, v[1].size) == (shape[0], math.prod(shape[1:])):
            fisher[name] = v
    out, scales = scaled_weights(out, fisher)
    if len(out) < len(names) / 2:
        raise AllocationError(f"{path}: only {len(out)} of {len(names)} tensors match the parameters of the "
                              f"{type(model).__name__} built from its config; no calibration")
    fill = float(np.median(list(out.values())))
    weights = {k: out.get(k, fill) for k in names}
    return (weights, scales) if channels else weights


def _load_for_calibration(path: Path) -> tuple[nn.Module, object]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            cls = transformers.AutoModel
        model = cls.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise AllocationError(f"{path}: cannot build the model and tokenizer for calibration ({_first_line(e)}); "
                             "pass --calibration none") from e
    return model.eval(), tok


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _text_blocks(tok: object, texts: Iterable[str], tokens: int, block: int, dev: torch.device) -> list[dict]:
    """``tokens`` tokens of ``texts`` as batches of one block each (the tokenizer's special tokens included)."""
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    head, tail = full[:at], full[at + len(plain):]  # the tokenizer's special tokens around a text
    body = max(block - len(head) - len(tail), 1)
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= tokens:
            break
    ids = ids[: max(tokens, 0)]
    starts = range(0, len(ids) - body + 1, body) if len(ids) >= body else ([0] if ids else [])
    out = []
    for i in starts:
        seq = torch.tensor([head + ids[i:i + body] + tail], device=dev)
        out.append({"input_ids": seq, "attention_mask": torch.ones_like(seq)})
    return out
