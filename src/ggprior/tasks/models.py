"""Small transformers models for CPU training, pretrained MiniLM, and the init schemes.

Architectures (built from transformers configs, randomly initialised):

- ``bert``: BERT encoder + classification head (classification tasks only).
- ``gpt2``: GPT-2 decoder; a causal LM on corpora, ``GPT2ForSequenceClassification`` (last
  token) on classification tasks.
- ``llama``: LLaMA decoder (RMSNorm, SwiGLU, rotary positions), likewise LM or classifier.
- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder with a fresh classification head
  (fine-tuning; uses MiniLM's own WordPiece tokenizer, loaded offline).

Size at ``scale`` s (integer >= 1): hidden 64 s, layers 2 s, heads 2 s, MLP 4x hidden
(LLaMA: 8/3 x hidden rounded to 16, its SwiGLU having three matrices). Input and output
embeddings are tied in the decoders. At s = 1 with a 4096-token vocabulary a model has about
0.37M parameters (0.26M of them the embedding) and trains an epoch of the sentiment task in
well under a minute on one CPU core; s = 2 is 4 layers of width 128 (~1.3M); s = 8 (width 512,
16 layers, ~50M) is for a GPU.

Init schemes (:func:`initialize_`), applied to the same weights (every Linear / Conv1D
matrix; see ``ggprior.init.gg_init_``): ``default`` keeps transformers' N(0, 0.02);
``he`` = ``torch.nn.init.kaiming_normal_`` (fan-in, ReLU gain, xi = 2); ``xavier`` =
``xavier_normal_``; ``gg`` = ``ggprior.init.gg_init_`` with shape gamma and the same xi = 2
as ``he``, so gamma = 2 is He in distribution and only the shape varies. Embeddings keep
their N(0, 0.02) scale (``gg`` re-samples them at that scale with shape gamma); norms and
biases keep transformers' init.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..io.sources import open_source
from ..runtime import is_conv1d
from .data import LABEL_NAMES, task_kind
from .tokenizer import TextTokenizer, get_tokenizer

ARCHITECTURES = ("bert", "gpt2", "llama", "minilm")
INIT_SCHEMES = ("default", "he", "xavier", "gg")
INIT_NONLINEARITY = "relu"


class ModelError(ValueError):
    """An unknown architecture, task kind, scale or init scheme."""


@dataclass(frozen=True)
class Size:
    """Width and depth of a small model."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


def size_for(arch: str, scale: int = 1) -> Size:
    """The :class:`Size` of ``arch`` at integer ``scale`` (see the module docstring)."""
    if not isinstance(scale, int) or scale < 1:
        raise ModelError(f"scale must be an integer >= 1, got {scale!r}")
    hidden = 64 * scale
    inter = 4 * hidden if arch != "llama" else 16 * round(8 * hidden / 3 / 16)
    return Size(hidden=hidden, layers=2 * scale, heads=2 * scale, intermediate=inter)


def check_arch(arch: str, kind: str) -> None:
    """Raise :class:`ModelError` unless ``arch`` can serve a ``kind`` task."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown model {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if kind not in ("classification", "lm"):
        raise ModelError(f"unknown task kind {kind!r}; known: classification, lm")
    if kind == "lm" and arch in ("bert", "minilm"):
        raise ModelError(f"{arch!r} is an encoder: language-modelling tasks need gpt2 or llama")


def build_model(
    arch: str, kind: str, *, vocab_size: int = 4096, num_labels: int = 2, max_positions: int = 512,
    pad_id: int = 0, scale: int = 1,
) -> nn.Module:
    """A randomly initialised small ``arch`` model for a ``kind`` task (or MiniLM, pretrained).

    Seed torch before calling for a reproducible init. ``pad_id`` is the tokenizer's padding
    id (the decoders' classifiers read the last non-padding token).
    """
    check_arch(arch, kind)
    if arch == "minilm":
        return load_minilm(num_labels)
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    s = size_for(arch, scale)
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=s.intermediate,
            max_position_embeddings=max_positions, pad_token_id=pad_id, num_labels=num_labels,
        )
        return BertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=s.hidden, n_layer=s.layers,
            n_head=s.heads, n_inner=s.intermediate, pad_token_id=pad_id, num_labels=num_labels,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        )
        return GPT2LMHeadModel(cfg) if kind == "lm" else GPT2ForSequenceClassification(cfg)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=max_positions, pad_token_id=pad_id, num_labels=num_labels,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(cfg) if kind == "lm" else LlamaForSequenceClassification(cfg)


def load_minilm(num_labels: int = 2, **kwargs) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh ``num_labels`` classification head, loaded offline (``kwargs`` go to
    ``from_pretrained``, e.g. ``attn_implementation``)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..io.sources import builtin_model_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = builtin_model_dir("minilm")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" warning is expected
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _matrices(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    out, seen = [], set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen:
            continue
        if isinstance(module, nn.Embedding):
            seen.add(id(w))
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            seen.add(id(w))
            out.append((f"{name}.weight", w, is_conv1d(module)))
    return out


def initialize_(
    model: nn.Module, scheme: str = "default", gamma: float = 2.0, *, generator: torch.Generator | None = None
) -> list[str]:
    """Re-initialise ``model``'s weight matrices in place with ``scheme``; returns names touched.

    See the module docstring for what each scheme does and which weights it touches.
    """
    if scheme not in INIT_SCHEMES:
        raise ModelError(f"unknown init {scheme!r}; known: {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return []
    if scheme == "gg":
        from ..init import gg_init_

        return gg_init_(model, gamma, INIT_NONLINEARITY, generator=generator)
    names = []
    with torch.no_grad():
        for name, w, transposed in _matrices(model):
            view = w.t() if transposed else w
            if scheme == "he":
                nn.init.kaiming_normal_(view, nonlinearity=INIT_NONLINEARITY, generator=generator)
            else:
                nn.init.xavier_normal_(view, generator=generator)
            names.append(name)
    return names


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def model_for_task(
    source: str | os.PathLike | Mapping[str, torch.Tensor], task: str, *, arch: str | None = None, scale: int = 1,
    vocab_size: int = 4096, max_len: int = 128,
) -> tuple[nn.Module, TextTokenizer]:
    """A trainable model for ``task`` holding ``source``'s weights, and its tokenizer.

    ``"minilm"``: all-MiniLM-L6-v2 with a fresh classification head and its WordPiece
    tokenizer. Any other source (a safetensors file, a state dict) needs ``arch`` (bert, gpt2,
    llama at ``scale``): the model is built as :func:`build_model` builds it for the
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
