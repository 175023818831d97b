"""ggprior.models: small configs, forward passes, init schemes, pretrained MiniLM."""

from __future__ import annotations

import math

import pytest
import torch

from ggprior import gg
from ggprior.tasks import models as M

VOCAB = 512


def _batch(n=3, length=10, num_labels=2):
    ids = torch.randint(3, VOCAB, (n, length))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    ids[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % num_labels}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_classifiers_forward(arch):
    torch.manual_seed(0)
    model = M.build_model(arch, "classification", vocab_size=VOCAB, num_labels=3, max_positions=64)
    out = model(**_batch(num_labels=3))
    assert out.logits.shape == (3, 3)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_language_models_forward_and_tie(arch):
    model = M.build_model(arch, "lm", vocab_size=VOCAB, max_positions=64)
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, VOCAB)
    assert 0 < out.loss.item() < 2 * math.log(VOCAB)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_scale_grows_the_model():
    small = M.count_parameters(M.build_model("gpt2", "lm", vocab_size=VOCAB))
    big = M.count_parameters(M.build_model("gpt2", "lm", vocab_size=VOCAB, scale=2))
    assert big > 4 * small  # width x2 (params ~x4) and depth x2
    s = M.size_for("llama", 3)
    assert (s.hidden, s.layers, s.heads) == (192, 6, 6) and s.intermediate % 16 == 0


def test_count_parameters_counts_tied_once():
    model = M.build_model("gpt2", "lm", vocab_size=VOCAB)
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert M.count_parameters(model) == with_duplicates - VOCAB * 64


def test_bad_arguments():
    with pytest.raises(M.ModelError, match="unknown model 'rnn'"):
        M.build_model("rnn", "classification")
    with pytest.raises(M.ModelError, match="encoder"):
        M.build_model("bert", "lm")
    with pytest.raises(M.ModelError, match="task kind"):
        M.build_model("gpt2", "translation")
    with pytest.raises(M.ModelError, match="scale"):
        M.size_for("bert", 0)
    with pytest.raises(M.ModelError, match="unknown init 'orthogonal'"):
        M.initialize_(M.build_model("bert", "classification", vocab_size=VOCAB), "orthogonal")


def _matrix_weights(model):
    return {n: w for n, w, _ in M._matrices(model)}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_he_and_xavier_have_the_right_variance(arch):
    model = M.build_model(arch, "classification", vocab_size=VOCAB, scale=2)
    gen = torch.Generator().manual_seed(0)
    names = M.initialize_(model, "he", generator=gen)
    weights = _matrix_weights(model)
    assert names == list(weights)
    for _name, w, transposed in M._matrices(model):
        fan_in = w.shape[0] if transposed else w.shape[1]
        if w.numel() > 15000:
            assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
    M.initialize_(model, "xavier", generator=gen)
    for _name, w, _ in M._matrices(model):
        if w.numel() > 15000:
            assert w.std().item() == pytest.approx(math.sqrt(2.0 / sum(w.shape)), rel=0.05)


def test_gg_init_has_the_shape_and_he_variance():
    model = M.build_model("llama", "classification", vocab_size=VOCAB, scale=2)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    names = M.initialize_(model, "gg", 0.5, generator=torch.Generator().manual_seed(1))
    assert set(_matrix_weights(model)) <= set(names)
    w = model.model.layers[0].mlp.gate_proj.weight.detach()
    fit = gg.fit(w.flatten())
    assert fit.gamma == pytest.approx(0.5, rel=0.1)
    assert fit.std == pytest.approx(math.sqrt(2.0 / w.shape[1]), rel=0.1)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.std().item() == pytest.approx(emb_before.std().item(), rel=0.05)
    assert gg.fit(emb.flatten()).gamma == pytest.approx(0.5, rel=0.1)


def test_default_init_and_he_leave_embeddings_and_norms():
    torch.manual_seed(0)
    model = M.build_model("bert", "classification", vocab_size=VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert M.initialize_(model, "default") == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = set(M.initialize_(model, "he"))
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v) != (k in names), k


def test_minilm_loads_with_a_fresh_head():
    model = M.build_model("minilm", "classification", num_labels=5)
    assert model.config.num_labels == 5 and model.classifier.out_features == 5
    assert 22_000_000 < M.count_parameters(model) < 23_000_000
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert model(input_ids=ids).logits.shape == (1, 5)
