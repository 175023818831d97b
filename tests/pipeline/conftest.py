"""A tiny stand-in for the pretrained MiniLM: a one-layer BERT with MiniLM's vocabulary, saved as a
transformers folder (random weights: the pipeline's pretrained path runs in seconds)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    from ggprior.tasks import get_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=get_tokenizer("minilm").vocab_size, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)
