"""ggprior.train.act: the ACT penalty (formula, ramps), activation bits, quantized evaluation, training effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOY_DIM as DIM
from conftest import TOY_VOCAB as VOCAB
from conftest import toy_model as _model
from conftest import toy_task
from ggprior.codec.histogram import histogram
from ggprior.train import TrainConfig, TrainError, evaluate, train
from ggprior.train.act import ACT, activation_bits, quantized_activations


def _task(n=96, seed=0, split="train"):
    return toy_task(n, seed, split, vocab=VOCAB)


def _outputs(model, batch):
    h = model.emb(batch["input_ids"])
    outs = []
    for block in model.layer:
        h = block(h)[0]
        outs.append(h[batch["attention_mask"].bool()])
    return outs


def test_penalty_formula_layer_weights_and_ramp():
    model = _model().train()
    data = _task(8)
    with torch.no_grad():
        rates = [float((o.abs() + 0.1).pow(0.7).mean()) for o in _outputs(model, data.tensors)]
    act = ACT(0.5, eps=0.1, ramp=0.5, layer_power=1.0, nu=0.7)
    act.on_train_begin(model, total_steps=10)
    model(**data.tensors)
    got = act.extra_loss(model, step=2)
    expect = 0.5 * (2 / 5) * (0.5 * rates[0] + 1.0 * rates[1]) / 1.5
    assert float(got.detach()) == pytest.approx(expect, rel=1e-5)
    assert act.scale(5) == act.scale(10) == 0.5 and act.scale(1) == pytest.approx(0.1)
    got.backward()  # differentiable through the network
    assert model.emb.weight.grad is not None and float(model.emb.weight.grad.abs().sum()) > 0
    assert act.extra_loss(model, step=3) is None  # outputs are consumed once
    with torch.no_grad():
        model(**data.tensors)
    assert act.extra_loss(model, step=4) is None  # nothing recorded without gradients
    act.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_errors():
    for kw in ({"lam": -1}, {"lam": 1, "eps": 0}, {"lam": 1, "ramp": 2}, {"lam": 1, "nu": 0}):
        with pytest.raises(TrainError):
            ACT(**kw)


def test_activation_bits_known_values():
    model = _model()
    data = _task(20)
    step = 0.25
    res = activation_bits(model, data, step=step, batch_size=7)
    with torch.no_grad():
        outs = _outputs(model, data.tensors)
    tokens = int(data.tensors["attention_mask"].sum())
    assert res["tokens"] == tokens and res["blocks"] == 2
    assert res["fp32_bits_per_token"] == 32 * DIM * 2
    qs = [torch.round(o / step).long().numpy().reshape(-1) for o in outs]
    entropy = sum(histogram(q).entropy_bits() for q in qs)
    assert res["entropy_bits_per_token"] == pytest.approx(entropy / tokens, rel=1e-6)
    zeros = sum(int((q == 0).sum()) for q in qs)
    assert res["zero_frac"] == pytest.approx(zeros / sum(q.size for q in qs))
    assert res["entropy_bits_per_token"] <= res["bits_per_token"] < res["fp32_bits_per_token"]


def test_quantized_activations():
    model = _model()
    data = _task(40)
    exact = evaluate(model, data)
    fine = quantized_activations(model, data, step=1e-6)
    assert fine["loss"] == pytest.approx(exact["loss"], abs=1e-4)
    coarse = quantized_activations(model, data, step=100.0)  # every block output becomes 0
    with torch.no_grad():
        m = data.tensors["attention_mask"]
        logits = model.classifier(torch.zeros(1, DIM)).expand(len(data), 2)
        loss = torch.nn.functional.cross_entropy(logits, data.tensors["labels"])
    assert coarse["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert m.sum() > 0 and evaluate(model, data)["loss"] == pytest.approx(exact["loss"])  # hooks removed


def test_act_training_makes_activations_cheaper():
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, warmup=0.1, progress=False, seed=0)
    val = _task(64, seed=1, split="validation")
    plain = _model()
    train(plain, _task(), val, cfg)
    constrained = _model()
    act = ACT(2.0, ramp=0.2)
    res = train(constrained, _task(), val, cfg, [act])
    act.remove()
    assert "act_rate_mean" in res["history"][-1] and 0.1 <= res["history"][-1]["act_nu_mean"] <= 3.0
    a, b = activation_bits(plain, val, step=0.1), activation_bits(constrained, val, step=0.1)
    assert b["bits_per_token"] < 0.8 * a["bits_per_token"]
    assert b["zero_frac"] > a["zero_frac"]
    assert res["history"][-1]["validation_accuracy"] > 0.9
    assert np.isfinite(res["history"][-1]["train_loss"])
