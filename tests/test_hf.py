"""ggprior.hf: BackSlash / ACT as transformers.Trainer callbacks, GCT registration, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from ggprior.gct import GCTError, register_gct
from ggprior.hf import ACTCallback, BackSlashCallback
from ggprior.tasks import TaskData
from ggprior.train import TrainError


def _data(n: int = 48, seq: int = 8, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, seq), generator=g)
    labels = (ids[:, 0] > 32).long()
    return TaskData("toy", "train", "classification",
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, num_labels=2)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-3,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


def _matrices(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() >= 2])


def test_backslash_callback_shrinks_weights_once_per_optimizer_step(tmp_path):
    plain, rated = _bert(), _bert()
    Trainer(model=plain, args=_args(tmp_path / "a"), train_dataset=_data()).train()
    cb = BackSlashCallback(10.0)  # a step of lam nu / N ~ 2e-3 per weight on these ~5k values (weights ~0.02)
    steps = []
    orig = cb.rate.step_
    cb.rate.step_ = lambda step: (steps.append(step), orig(step))[1]
    tr = Trainer(model=rated, args=_args(tmp_path / "b", gradient_accumulation_steps=2), train_dataset=_data(),
                 callbacks=[cb])
    tr.train()
    assert steps == list(range(1, tr.state.global_step + 1)) and tr.state.global_step == 3
    assert float(_matrices(rated).abs().mean()) < float(_matrices(plain).abs().mean())
    assert 0.1 <= cb.nu_last[0] <= 3.0 and cb.history[0]["rate_active"]


def test_act_callback_adds_the_rate_to_the_loss(tmp_path):
    cb = ACTCallback(5.0, ramp=0.0)
    model = _bert()
    tr = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[cb])
    out = tr.train()
    plain = Trainer(model=_bert(), args=_args(tmp_path / "p"), train_dataset=_data()).train()
    assert out.training_loss > plain.training_loss + 1.0  # lam * mean (|a| + eps)^nu over unit-scale activations
    assert cb.history[0]["act_rate_mean"] > 0 and cb.handle is None


class NoMatrices(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return {"loss": (self.scale.sum() - 1) ** 2}


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(TrainError, match="NoMatrices has no trainable matrices"):
        Trainer(model=NoMatrices(), args=_args(tmp_path), train_dataset=_data(), callbacks=[BackSlashCallback(1.0)]).train()
    with pytest.raises(TrainError, match="ACTCallback: .*no transformer blocks"):
        Trainer(model=NoMatrices(), args=_args(tmp_path), train_dataset=_data(), callbacks=[ACTCallback(1.0)]).train()
    with pytest.raises(GCTError, match="needs a DistributedDataParallel model"):
        register_gct(nn.Linear(2, 2))


def test_a_lambda_that_breaks_training_stops_naming_step_and_lambda_and_keeps_the_checkpoint(tmp_path):
    args = _args(tmp_path, num_train_epochs=3, save_strategy="steps", save_steps=1)
    with pytest.raises(TrainError, match=r"at step \d+ with lambda=1e\+30"):
        Trainer(model=_bert(), args=args, train_dataset=_data(), callbacks=[BackSlashCallback(1e30)]).train()
    assert list(tmp_path.glob("checkpoint-*/model.safetensors"))
