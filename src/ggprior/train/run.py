"""One training run end to end: data, model, init, rate callback, training, compression figures.

:func:`run` is what ``ggprior train`` and the studies in ``experiments/`` call. It writes
(with ``out_dir``) ``metrics.json`` (rewritten every epoch by the trainer, completed at the
end), ``model.safetensors`` and ``tokenizer.json``.

Compression figures (SPEC.md section 4, OPEN points decided here):

- Quantization step: one absolute step for every weight matrix, ``step = 2^-8`` by default
  (``QUANT_STEP``). A fixed step is a fixed distortion (uniform noise of variance step^2/12
  per weight), so models trained differently are compared at equal distortion and a rate
  penalty that concentrates weights near zero shows up as fewer bits. (A per-tensor step from
  a bit budget would rescale with the weights and hide exactly that.) The quantized model's
  test metric is reported beside the float one (``quantized_test``) to show the step keeps
  accuracy.
- Which tensors: matrices (ndim >= 2: linear layers and embeddings, tied ones once); norms
  and biases are kept exact and counted at 32 bits in the whole-model sizes.
- Coders: FL (width covering each tensor's integer range), EG (best order per tensor), HM
  (Huffman), ANS (rANS under the fitted GG), and the empirical entropy (ideal). Side
  information is counted as in :func:`ggprior.codec.measure`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from ..codec.lengths import measure, quantized_state_dict
from ..io.atomic import atomic_path, write_text
from ..tasks.data import load_task, task_info, task_kind
from ..tasks.models import INIT_SCHEMES, ModelError, build_model, check_arch, count_parameters, initialize_
from ..tasks.tokenizer import get_tokenizer
from .backslash import RATES, make_rate_callback
from .loop import TrainConfig, TrainError, evaluate, train

QUANT_STEP = 2.0**-8
CODERS = ("fl", "eg", "huffman", "ans", "entropy")
INCLUDE = "matrices"


@dataclass
class RunConfig:
    """Everything one run depends on (saved in ``metrics.json``)."""

    task: str = "sentiment"
    model: str = "bert"
    init: str = "he"
    gamma: float = 2.0
    rate: str = "none"
    lam: float = 0.0
    rate_epochs: int | None = None
    per_tensor: bool = False
    eps: float | None = None
    scale: int = 1
    max_len: int = 128
    vocab_size: int = 4096
    max_train: int | None = None
    max_eval: int | None = None
    step: float = QUANT_STEP
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check_arch(self.model, task_kind(self.task))
        if self.init not in INIT_SCHEMES:
            raise ModelError(f"unknown init {self.init!r}; known: {', '.join(INIT_SCHEMES)}")
        if self.rate not in RATES:
            raise TrainError(f"unknown rate {self.rate!r}; known: {', '.join(RATES)}")
        if self.rate != "none" and not self.lam > 0:
            raise TrainError(f"rate {self.rate!r} needs lam > 0, got {self.lam}")
        if not self.step > 0:
            raise TrainError(f"quantization step must be positive, got {self.step}")
        if self.rate_epochs is not None and not 0 <= self.rate_epochs <= self.train.epochs:
            raise TrainError(f"rate_epochs must be in [0, epochs={self.train.epochs}], got {self.rate_epochs}")
        self.train.validate()
        make_rate_callback(self.rate, self.lam, eps=self.eps, per_tensor=self.per_tensor)  # checks eps


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters (tied ones once), detached: what the compression figures measure."""
    return {n: p.detach() for n, p in model.named_parameters()}


def compression_figures(model: nn.Module, step: float = QUANT_STEP) -> dict:
    """Bits/weight, CR against FL and model bytes for each coder at ``step`` (matrices quantized)."""
    _, s = measure(weight_tensors(model), step=step, coders=CODERS, include=INCLUDE)
    keep = ["weights", "orig_bytes", "exact_bytes"]
    for c in CODERS:
        keep += [f"bpw_{c}", f"cr_{c}", f"model_bytes_{c}"]
    out = {k: s[k] for k in keep}
    out.update(step=step, include=INCLUDE)
    return out


def quantized_metrics(model: nn.Module, data, step: float = QUANT_STEP, batch_size: int = 128) -> dict[str, float]:
    """Metrics of ``model`` with its matrices quantized at ``step`` (the model itself is unchanged)."""
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = quantized_state_dict(weight_tensors(model), step=step, include=INCLUDE)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in q.items():
            params[n].copy_(t)
        try:
            return evaluate(model, data, batch_size)
        finally:
            for n, t in original.items():
                params[n].copy_(t)


def build(cfg: RunConfig):
    """Tokenizer, (train, validation, test) data and the initialised model of a run."""
    kind = task_kind(cfg.task)
    tok = get_tokenizer("minilm") if cfg.model == "minilm" else get_tokenizer("bpe", cfg.task, cfg.vocab_size)
    data = [load_task(cfg.task, split, tok, cfg.max_len, max_examples=limit)
            for split, limit in (("train", cfg.max_train), ("validation", cfg.max_eval), ("test", cfg.max_eval))]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, kind, vocab_size=tok.vocab_size, num_labels=max(data[0].num_labels, 2),
                        max_positions=cfg.max_len, pad_id=tok.pad_id, scale=cfg.scale)
    if cfg.model != "minilm":
        initialize_(model, cfg.init, cfg.gamma, generator=torch.Generator().manual_seed(cfg.train.seed))
    return tok, data, model


def run(cfg: RunConfig, out_dir: str | Path | None = None, *, resume: bool = False) -> dict:
    """Train one configuration; returns (and writes) the metrics with compression figures."""
    cfg.validate()
    tok, (train_data, val_data, test_data), model = build(cfg)
    callbacks = [cb for cb in [make_rate_callback(cfg.rate, cfg.lam, epochs=cfg.rate_epochs, eps=cfg.eps,
                                                  per_tensor=cfg.per_tensor)] if cb is not None]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        tok.save(out / "tokenizer.json")
    result = train(model, train_data, val_data, cfg.train, callbacks, out_dir=out, resume=resume,
                   test_data=test_data)
    t0 = time.perf_counter()
    result["compression"] = compression_figures(model, cfg.step)
    result["quantized_test"] = quantized_metrics(model, test_data, cfg.step, cfg.train.eval_batch_size)
    result["compression_seconds"] = time.perf_counter() - t0
    result["run"] = {k: v for k, v in asdict(cfg).items() if k != "train"}
    result["parameters"] = count_parameters(model)
    result["data"] = {"train": len(train_data), "validation": len(val_data), "test": len(test_data),
                      "tokenizer": tok.name, "label_balance": _balance(cfg.task)}
    if out is not None:
        with atomic_path(out / "model.safetensors") as tmp:
            save_model(model, str(tmp))
        write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def _balance(task: str) -> dict:
    info = task_info(task)
    return {s: v.get("labels", v) for s, v in info["splits"].items()}
