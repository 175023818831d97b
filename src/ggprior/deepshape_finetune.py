"""DeepShape with fine-tuning (Algorithm 1, step 4) and iterated DeepShape, through the trainer.

One round = reshape the model's weights in place (:func:`ggprior.deepshape.deepshape_`), then
fine-tune ``epochs`` epochs with :func:`ggprior.train.train`. ``rounds > 1`` repeats it (the
paper's iterated DeepShape): every round fits the weights afresh, so the targets compound
(gamma x K_gamma^r, beta x K_beta^r before fine-tuning pulls them back). Each round fine-tunes
with its own seed (``config.seed + round``) and a fresh optimizer and schedule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from .data import LABEL_NAMES, TaskData, TextTokenizer, get_tokenizer, task_kind
from .deepshape import ShapeReport, deepshape_
from .models import build_model, load_minilm
from .sources import open_source
from .train import Callback, TrainConfig, evaluate, train


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


def model_for_task(
    source: str | os.PathLike | Mapping[str, torch.Tensor], task: str, *, arch: str | None = None, scale: int = 1,
    vocab_size: int = 4096, max_len: int = 128,
) -> tuple[nn.Module, TextTokenizer]:
    """A trainable model for ``task`` holding ``source``'s weights, and its tokenizer.

    ``"minilm"``: all-MiniLM-L6-v2 with a fresh classification head and its WordPiece
    tokenizer. Any other source (a safetensors file, a state dict) needs ``arch`` (bert, gpt2,
    llama at ``scale``): the model is built as ``ggprior.models.build_model`` builds it for the
    task, with the task's BPE tokenizer of ``vocab_size`` tokens, and the weights are loaded
    strictly (missing or unexpected tensors are named in the error).
    """
    kind = task_kind(task)
    num_labels = len(LABEL_NAMES[task]) if kind == "classification" else 2
    if isinstance(source, str) and source == "minilm":
        if kind != "classification":
            raise ValueError(f"minilm is an encoder: task {task!r} is a language-modelling corpus")
        return load_minilm(num_labels), get_tokenizer("minilm")
    if arch is None:
        raise ValueError(f"{source}: fine-tuning a weights file needs the architecture (arch=bert|gpt2|llama)")
    tok = get_tokenizer("bpe", task, vocab_size)
    model = build_model(arch, kind, vocab_size=tok.vocab_size, num_labels=num_labels, max_positions=max_len,
                        pad_id=tok.pad_id, scale=scale)
    src = open_source(source)
    state = {k: src[k] for k in src}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _tied_or_buffer(model, k, state)]
    if missing or unexpected:
        raise ValueError(f"{src.label}: does not fit {arch} (scale {scale}, vocab {tok.vocab_size}) for {task}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, tok


def _tied_or_buffer(model: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> bool:
    """A key a weights file may omit: a buffer, or a parameter tied to one that is present."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return True
    ptr = params[name].data_ptr()
    return any(p.data_ptr() == ptr and k in state for k, p in params.items() if k != name)
