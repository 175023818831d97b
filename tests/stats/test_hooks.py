"""ggprior.hooks: activation/gradient GG statistics (two-pass fits, masks, pools, callbacks, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TOY_DIM as DIM
from conftest import TOY_VOCAB as VOCAB
from conftest import toy_model as _model
from ggprior import gg
from ggprior.stats import hooks
from ggprior.tasks import TaskData
from ggprior.train import GradientSnapshots, TrainConfig, train


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 3:] = 0
        mask[2, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


def _rows(rows):
    return {r["name"]: r for r in rows}


def test_collector_matches_a_direct_fit():
    g = torch.Generator().manual_seed(1)
    chunks = [gg.sample((n,), 0.3, 1.5, 0.8, generator=g) for n in (500, 1200, 7)]
    col = hooks.StatsCollector(max_samples=300, seed=0)
    for p in (1, 2):
        if p == 2:
            col.next_pass()
        for c in chunks:
            col.add("x", c, "mlp", "activations")
    rows = _rows(col.rows())
    direct = gg.fit(torch.cat(chunks).double())
    r = rows["x"]
    assert r["numel"] == 1707
    assert r["gamma"] == pytest.approx(direct.gamma, rel=1e-6)
    assert r["beta"] == pytest.approx(direct.beta, rel=1e-6)
    assert r["mu"] == pytest.approx(direct.mu, abs=1e-9)
    assert col.samples("x").numel() <= 300
    assert rows["group:activations:mlp"]["numel"] == rows["__activations__"]["numel"] == 1707
    assert {"loglik_gg", "best_law"} <= set(r)


def test_mle_refit_recovers_a_heavy_tailed_shape():
    g = torch.Generator().manual_seed(2)
    x = gg.sample((40000,), 0.0, 0.01, 0.3, generator=g)
    col = hooks.StatsCollector(max_samples=20000, seed=0)
    for p in (1, 2):
        if p == 2:
            col.next_pass()
        for c in x.split(10000):
            col.add("g", c, "mlp", "gradients")
    r = _rows(col.rows(mle=True))["g"]
    assert r["gamma_mle"] == pytest.approx(0.3, rel=0.1)
    assert r["loglik_gg_mle"] > max(r["loglik_gauss"], r["loglik_laplace"]) and r["best_law"] == "gg"


def test_collector_errors():
    with pytest.raises(hooks.HookError, match="max_samples"):
        hooks.StatsCollector(max_samples=-1)
    col = hooks.StatsCollector()
    with pytest.raises(hooks.HookError, match="saw no values"):
        col.next_pass()
    col.add("a", torch.ones(3), "mlp", "activations")
    with pytest.raises(hooks.HookError, match="both passes"):
        col.rows()
    col.next_pass()
    with pytest.raises(hooks.HookError, match="first seen in pass 2"):
        col.add("b", torch.ones(3), "mlp", "activations")
    with pytest.raises(hooks.HookError, match="already in pass 2"):
        col.next_pass()
    with pytest.raises(hooks.HookError, match="unknown kind"):
        hooks.tensor_rows([("w", torch.ones(2))], "weights")


def test_activation_statistics_skip_padding_and_clean_up():
    model = _model()
    data = _batches()
    samples = {}
    rows = _rows(hooks.activation_statistics(model.train(), lambda: data, progress=False, max_samples=100,
                                             samples=samples))
    assert set(samples) == {n for n in rows if n.startswith(("__", "group:"))}
    assert 0 < samples["__activations__"].numel() <= 100
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert rows["layer.0"]["group"] == hooks.BLOCK_GROUP
    assert rows["layer.0"]["numel"] == rows["layer.1.fc"]["numel"] == tokens * DIM
    assert rows["emb"]["numel"] == tokens * DIM
    assert rows["classifier"]["numel"] == 3 * 4 * 2  # (batch, classes): no sequence axis, nothing masked
    # the block output of the real forward pass, padding dropped, fitted directly
    with torch.no_grad():
        outs = []
        for b in data:
            h = model.layer[0](model.emb(b["input_ids"]))[0]
            outs.append(h[b["attention_mask"].bool()].reshape(-1))
    assert rows["layer.0"]["gamma"] == pytest.approx(gg.fit(torch.cat(outs).double()).gamma, rel=1e-6)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_gradient_statistics_known_values_and_no_update():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _batches(2)
    rows = _rows(hooks.gradient_statistics(model, lambda: data, progress=False))
    grads = []
    for b in data:
        model.zero_grad()
        model(**b).loss.backward()
        grads.append(model.layer[1].fc.weight.grad.reshape(-1).clone())
    model.zero_grad(set_to_none=True)
    r = rows["layer.1.fc.weight"]
    assert r["numel"] == 2 * DIM * DIM and r["kind"] == "gradients"
    assert r["gamma"] == pytest.approx(gg.fit(torch.cat(grads).double()).gamma, rel=1e-6)
    assert rows["__gradients__"]["numel"] == 2 * sum(p.numel() for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_runner_errors():
    model = _model()
    with pytest.raises(hooks.HookError, match="no batches"):
        hooks.activation_statistics(model, lambda: [], progress=False)
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(1)]
    with pytest.raises(hooks.HookError, match="labels"):
        hooks.gradient_statistics(model, lambda: unlabeled, progress=False)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(hooks.HookError, match="no transformer blocks"):
        hooks.transformer_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_gradient_snapshots_callback_in_training():
    batches = _batches(4)
    tensors = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    data = TaskData("toy", "train", "classification", tensors, num_labels=2)
    snap = GradientSnapshots(every=2, max_samples=256)
    train(_model(), data, config=TrainConfig(epochs=1, batch_size=4, progress=False), callbacks=[snap])
    steps = sorted({r["step"] for r in snap.rows})
    assert steps == [1, 3]
    pooled = [r for r in snap.rows if r["name"] == "__gradients__"]
    assert len(pooled) == 2 and all(r["numel"] == sum(p.numel() for p in _model().parameters()) for r in pooled)
    with pytest.raises(hooks.HookError, match="every"):
        GradientSnapshots(every=0)
