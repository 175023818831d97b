"""A GG-initialized model written from a configuration (``ggprior init CONFIG OUT --gamma G``).

CONFIG is a transformers ``config.json``, a Hugging Face folder holding one, ``minilm`` (the
built-in MiniLM's configuration), or a built-in architecture (``bert``, ``gpt2``, ``llama`` at
``scale``, as :func:`ggprior.tasks.models.build_model` builds them). The model class is the
configuration's first ``architectures`` entry when transformers knows it, else ``AutoModel``.
Every weight matrix gets :func:`ggprior.init.gg_init_`; embeddings are re-sampled at their
own scale with shape gamma and their ``padding_idx`` rows set back to zero, as transformers
initialises them. The result is written with ``save_pretrained`` (``model.safetensors`` +
``config.json``), so ``AutoModel.from_pretrained(OUT)`` loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..init import gg_init_
from ..io.sources import BUILTIN_MODELS, builtin_model_dir
from .models import ModelError, build_model

BUILT_IN = ("bert", "gpt2", "llama")


def model_from_config(config: str | os.PathLike, *, scale: int = 1, vocab_size: int = 4096) -> nn.Module:
    """A randomly initialised transformers model for ``config`` (see the module docstring)."""
    text = os.fspath(config)
    if text in BUILT_IN:
        return build_model(text, "classification" if text == "bert" else "lm", vocab_size=vocab_size, scale=scale)
    import transformers

    path = builtin_model_dir(text) if text in BUILTIN_MODELS else Path(text)
    if not path.exists():
        raise ModelError(f"{path}: no such config file or folder (and not a built-in: {', '.join(BUILT_IN)}, "
                         f"{', '.join(BUILTIN_MODELS)})")
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file() and path.is_dir():
        raise ModelError(f"{path}: folder has no config.json")
    try:
        if path.is_dir():
            cfg = transformers.AutoConfig.from_pretrained(str(path))
        else:
            import json

            data = json.loads(path.read_text())
            cfg = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: not a transformers configuration ({e})") from e
    name = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    return cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)


def zero_padding_rows_(model: nn.Module) -> list[str]:
    """Set the ``padding_idx`` row of every embedding to zero; returns the embeddings touched."""
    names = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
                names.append(name)
    return names


def write_initialized(config: str | os.PathLike, out: str | os.PathLike, gamma: float, *,
                      nonlinearity: str = "relu", embeddings: str = "shape", seed: int = 0, scale: int = 1,
                      vocab_size: int = 4096) -> tuple[nn.Module, list[str]]:
    """Build ``config``'s model, GG-initialise it with shape ``gamma`` and save it to the folder ``out``.

    Returns (model, names of the initialised weights).
    """
    torch.manual_seed(seed)
    model = model_from_config(config, scale=scale, vocab_size=vocab_size)
    names = gg_init_(model, gamma, nonlinearity, embeddings=embeddings,
                     generator=torch.Generator().manual_seed(seed))
    zero_padding_rows_(model)
    model.save_pretrained(str(out), safe_serialization=True)
    return model, names
