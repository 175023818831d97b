"""Shared by the examples: a built-in task (ggprior.data) and a small BERT built from a config."""

from __future__ import annotations

import torch

from ggprior.tasks import build_model, get_tokenizer, load_task


def task_and_model(task: str, *, tiny: bool, seed: int = 0, max_len: int = 64, vocab: int = 4096,
                   max_train: int | None = None):
    """(train, validation, model): the task's splits encoded with its BPE tokenizer, a seeded small BERT."""
    if tiny:
        max_len, vocab, max_train = 16, 1024, 64
    tok = get_tokenizer("bpe", task, vocab)
    train = load_task(task, "train", tok, max_len, max_examples=max_train)
    val = load_task(task, "validation", tok, max_len, max_examples=32 if tiny else None)
    torch.manual_seed(seed)
    model = build_model("bert", "classification", vocab_size=tok.vocab_size, num_labels=max(train.num_labels, 2),
                        max_positions=max_len, pad_id=tok.pad_id)
    return train, val, model
