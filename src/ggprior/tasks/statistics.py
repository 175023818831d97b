"""GG statistics of a model's activations and gradients on a task (``ggprior fit --activations/--gradients``).

Two kinds of model:

* the built-in ``minilm`` on a classification task: MiniLM with a fresh classification head,
  its WordPiece tokenizer, gradients of the classification loss;
* any Hugging Face model folder with its tokenizer (``config.json``, weights, tokenizer files),
  on a built-in task or corpus or on a user's text file (one example a non-empty line):
  a causal LM (``config.architectures`` naming ``*ForCausalLM`` / ``*LMHeadModel``) gives the
  gradients of its next-token loss, any other model those of a masked-LM loss (15% of the
  non-special tokens masked, seeded; an encoder saved without an MLM head gets a fresh one,
  which transformers reports).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io.sources import builtin_model_dir
from ..stats.hooks import activation_statistics, gradient_statistics
from .data import DataError, batches, corpus_split, load_task, task_kind, task_split
from .models import ModelError, load_minilm
from .tokenizer import get_tokenizer

KINDS = ("activations", "gradients")
RUNTIME_COLUMNS = ["name", "kind", "group", "numel", "mu", "beta", "gamma", "std", "gamma_at_bound", "entropy_bits",
                   "mu_mle", "beta_mle", "gamma_mle", "loglik_gg_mle", "loglik_gg", "loglik_gauss", "loglik_laplace",
                   "ks_gg", "ks_gauss", "ks_laplace", "best_law", "note"]
MASK_FRACTION = 0.15
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")


def task_statistics(source: str, kinds: list[str], task: str = "sentiment", examples: int = 64, batch_size: int = 16,
                    *, text: str | os.PathLike | None = None, max_len: int = 128, seed: int = 0,
                    mle: bool = False) -> tuple[list[dict], int]:
    """GG rows of ``source``'s activations and/or gradients (``kinds``) over at most ``examples``
    examples of ``task`` (its training split) or of the lines of ``text``; returns (rows, number of examples).

    ``source`` is ``minilm`` or a Hugging Face model folder with its tokenizer.
    """
    if examples < 1 or batch_size < 1 or max_len < 2:
        raise DataError(f"examples, batch size and max length must be positive, got {examples}, {batch_size}, {max_len}")
    if source == "minilm" and text is None:
        return _minilm_statistics(kinds, task, examples, batch_size, max_len, seed, mle)
    folder = builtin_model_dir("minilm") if source == "minilm" else Path(source)
    texts = _texts(task, text, examples)
    model, tok, causal = _load_folder(folder)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    data = _encode(tok, texts, batch_size, min(max_len, positions or max_len), causal, seed)
    return _run(model, lambda: iter(data), kinds, seed, mle), len(texts)


def _run(model: torch.nn.Module, feed, kinds: list[str], seed: int, mle: bool) -> list[dict]:
    rows = []
    if "activations" in kinds:
        rows += activation_statistics(model, feed, seed=seed, mle=mle)
    if "gradients" in kinds:
        rows += gradient_statistics(model, feed, seed=seed, mle=mle)
    return rows


def _minilm_statistics(kinds: list[str], task: str, examples: int, batch_size: int, max_len: int, seed: int,
                       mle: bool) -> tuple[list[dict], int]:
    data = load_task(task, "train", get_tokenizer("minilm"), max_len, max_examples=examples)
    if data.kind != "classification":
        raise DataError(f"task {task!r} is a language-modelling corpus; MiniLM's classifier needs a classification "
                        f"task (or give --text FILE)")
    model = load_minilm(max(data.num_labels, 2))
    return _run(model, lambda: batches(data, batch_size), kinds, seed, mle), len(data)


def _load_folder(folder: Path) -> tuple[torch.nn.Module, object, bool]:
    """The model of a Hugging Face folder (causal LM or masked-LM head), its tokenizer, and whether it is causal."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a Hugging Face model folder (no config.json); --activations/--gradients "
                         f"run the model, so they need a folder with config.json, weights and tokenizer, or minilm")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder}: no tokenizer files (any of {', '.join(TOKENIZER_FILES)}); --activations/"
                         f"--gradients tokenize text with the model's own tokenizer")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a missing/broken tokenizer
        raise ModelError(f"{folder}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    try:
        config = AutoConfig.from_pretrained(str(folder))
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
        model = auto.from_pretrained(str(folder), config=config)
    except Exception as e:
        raise ModelError(f"{folder}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    if not causal and tok.mask_token_id is None:
        raise ModelError(f"{folder}: not a causal LM and its tokenizer has no mask token (masked-LM loss impossible)")
    return model, tok, causal


def _texts(task: str, text: str | os.PathLike | None, examples: int) -> list[str]:
    if text is not None:
        path = Path(text)
        try:
            lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the text file ({e})") from e
        texts = [s for s in lines if s]
        if not texts:
            raise DataError(f"{path}: no non-empty line to use as an example")
        return texts[:examples]
    return (corpus_split(task, "train") if task_kind(task) == "lm" else task_split(task, "train")[0])[:examples]


def _encode(tok, texts: list[str], batch_size: int, max_len: int, causal: bool, seed: int) -> list[dict]:
    """Fixed batches (built once, so both passes of the hooks see the same masks): input ids, attention mask, labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                  return_special_tokens_mask=not causal)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if causal:
            labels = ids.masked_fill(mask == 0, -100)
        else:
            pick = (torch.rand(ids.shape, generator=gen) < MASK_FRACTION) & (mask == 1) & (enc["special_tokens_mask"] == 0)
            labels = ids.masked_fill(~pick, -100)
            ids = ids.masked_fill(pick, tok.mask_token_id)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
