"""ggprior.train.loop: learning, evaluation, determinism, hooks, checkpoint/resume, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import BAG_VOCAB as VOCAB
from conftest import bag_model as _model
from conftest import toy_task as _task
from conftest import train_cfg as _cfg
from ggprior.tasks import TaskData
from ggprior.train import Callback, TrainError, evaluate, train
from ggprior.train.loop import lr_at


def test_learns_a_separable_task():
    model = _model()
    before = evaluate(model, _task(64, seed=1, split="validation"))["accuracy"]
    res = train(model, _task(), _task(64, seed=1, split="validation"), _cfg(epochs=4), test_data=_task(64, seed=2))
    hist = res["history"]
    assert len(hist) == 4 and hist[-1]["step"] == res["steps"] == 4 * 6
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["validation_accuracy"] > max(0.9, before)
    assert res["test"]["accuracy"] > 0.9


def test_evaluate_known_values():
    model = _model()
    data = _task(10)
    with torch.no_grad():
        out = model.eval()(**data.tensors)
    expect_acc = float((out.logits.argmax(-1) == data.tensors["labels"]).float().mean())
    for bs in (3, 100):  # the average must not depend on the batch size
        got = evaluate(model, data, batch_size=bs)
        assert got["accuracy"] == pytest.approx(expect_acc)
        assert got["loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_evaluate_perplexity_of_a_language_model():
    from ggprior.tasks.models import build_model

    torch.manual_seed(0)
    lm = build_model("gpt2", "lm", vocab_size=VOCAB, max_positions=16).eval()
    ids = torch.randint(0, VOCAB, (5, 12))
    data = TaskData("toy", "validation", "lm", {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                "labels": ids})
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    got = evaluate(lm, data, batch_size=2)
    assert got["loss"] == pytest.approx(float(nll), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_same_seed_same_weights_other_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        model = _model()
        train(model, _task(), None, _cfg(seed=seed))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


class Recorder(Callback):
    def __init__(self, extra=0.0, crash_at_epoch=None):
        self.calls, self.extra, self.crash_at_epoch = [], extra, crash_at_epoch
        self.counter = 0

    def on_train_begin(self, model, total_steps):
        self.calls.append(("begin", total_steps))

    def on_epoch_begin(self, model, epoch):
        if epoch == self.crash_at_epoch:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(("epoch", epoch))

    def extra_loss(self, model, step):
        return torch.tensor(self.extra) if self.extra else None

    def on_after_backward(self, model, step):
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append(("backward", step))

    def on_step_end(self, model, step):
        self.counter += 1
        self.calls.append(("step", step))

    def on_epoch_end(self, model, epoch):
        return {"recorder_steps": self.counter}

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def test_callback_hooks_order_and_metrics():
    rec = Recorder(extra=0.25)
    res = train(_model(), _task(), None, _cfg(), [rec])
    steps = res["steps"]
    assert rec.calls[0] == ("begin", steps)
    assert [c for c in rec.calls if c[0] == "step"] == [("step", s) for s in range(1, steps + 1)]
    assert [c for c in rec.calls if c[0] == "backward"] == [("backward", s) for s in range(1, steps + 1)]
    assert rec.calls.index(("epoch", 1)) > rec.calls.index(("step", steps // 2))
    assert [h["recorder_steps"] for h in res["history"]] == [steps // 2, steps]
    assert all(h["extra_loss"] == pytest.approx(0.25) for h in res["history"])


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    ref = _model()
    ref_res = train(ref, _task(), _task(32, seed=1), _cfg(epochs=3), [Recorder()])

    crashed = _model()
    with pytest.raises(KeyboardInterrupt):
        train(crashed, _task(), _task(32, seed=1), _cfg(epochs=3), [Recorder(crash_at_epoch=2)], out_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "epoch1.model.safetensors", "epoch1.state.safetensors", "latest.json"]

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    res = train(resumed, _task(), _task(32, seed=1), _cfg(epochs=3), [Recorder()], out_dir=tmp_path, resume=True)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [h["validation_loss"] for h in res["history"]] == [h["validation_loss"] for h in ref_res["history"]]
    assert res["history"][-1]["recorder_steps"] == ref_res["history"][-1]["recorder_steps"]
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == ref_res["steps"]


def test_resume_with_other_settings_is_refused(tmp_path):
    train(_model(), _task(), None, _cfg(epochs=1), out_dir=tmp_path)
    with pytest.raises(TrainError, match="batch_size=16"):
        train(_model(), _task(), None, _cfg(epochs=1, batch_size=8), out_dir=tmp_path, resume=True)
    with pytest.raises(TrainError, match="callback"):
        train(_model(), _task(), None, _cfg(epochs=1), [Recorder()], out_dir=tmp_path, resume=True)


def test_lr_schedule():
    cfg = _cfg(lr=1.0, warmup=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:20], lrs[1:20], strict=False))
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))
    assert lrs[-1] == pytest.approx(1.0 / 80)
    assert lr_at(0, 10, _cfg(lr=0.3, warmup=0.0)) == pytest.approx(0.3)


def test_errors():
    with pytest.raises(TrainError, match="epochs"):
        train(_model(), _task(), None, _cfg(epochs=0))
    with pytest.raises(TrainError, match="lr"):
        train(_model(), _task(), None, _cfg(lr=-1.0))
    with pytest.raises(TrainError, match="resume needs out_dir"):
        train(_model(), _task(), None, _cfg(), resume=True)
    with pytest.raises(TrainError, match="loss became nan at step 1"):
        train(_model(), _task(), None, _cfg(), [Recorder(extra=float("nan"))])
    empty = TaskData("toy", "validation", "classification",
                     {k: v[:0] for k, v in _task().tensors.items()}, num_labels=2)
    with pytest.raises(TrainError, match="no examples"):
        evaluate(_model(), empty)


def test_training_is_reproducible_across_processes():
    """Issue 16 item 12: the same seed and thread count give bit-identical weights in two fresh processes
    (different hash seeds, so nothing may depend on set or dict-of-str iteration order or on global RNG state)."""
    code = textwrap.dedent("""
        import hashlib, sys, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import bag_model, toy_task, train_cfg
        from ggprior.train import BackSlash, train
        torch.set_num_threads(2)
        model = bag_model()
        train(model, toy_task(), toy_task(32, seed=1), train_cfg(seed=3), [BackSlash(2.0)])
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        print(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
    """)
    tests = str(Path(__file__).resolve().parents[1])
    digests = {subprocess.run([sys.executable, "-c", code, tests], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip() for h in (1, 2)}
    assert len(digests) == 1 and len(digests.pop()) == 64
