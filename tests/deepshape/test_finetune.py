"""DeepShape + fine-tuning through the trainer, and iterated DeepShape."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ggprior import gg
from ggprior.deepshape import reshape_values
from ggprior.deepshape.finetune import deepshape_finetune, summarize_reports
from ggprior.tasks import TaskData
from ggprior.train import TrainConfig


def toy_task(n=48, vocab=64, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = (ids[:, 0] % 2).to(torch.long)  # learnable from the first token
    return TaskData("toy", "train", "classification",
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, num_labels=2)


class Toy(nn.Module):
    """A bag-of-embeddings classifier with the trainer's interface (two matrices of >= 4096 values)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.fc = nn.Linear(64, 96)
        self.head = nn.Linear(96, 2)

    def forward(self, input_ids, attention_mask, labels):
        h = (self.embed(input_ids) * attention_mask[..., None]).mean(1)
        logits = self.head(torch.relu(self.fc(h)))
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


def toy_model(seed=0):
    torch.manual_seed(seed)
    return Toy()


OPTS = {"min_numel": 4096, "select": "matrices"}
CFG = TrainConfig(epochs=1, batch_size=16, lr=1e-3, progress=False)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2 and p.numel() >= 4096}


def test_rounds_without_fine_tuning_compound_the_targets():
    model = toy_model()
    w0 = weights(model)
    rows = deepshape_finetune(model, toy_task(), 1.0, 0.8, epochs=0, rounds=2, **OPTS)
    assert [r["round"] for r in rows] == [1, 2] and all("train" not in r for r in rows)
    for name, w in weights(model).items():
        assert gg.fit(w).beta == pytest.approx(0.64 * gg.fit(w0[name]).beta, rel=0.03), name
    assert rows[1]["reshape"]["beta_before"] == pytest.approx(0.8 * rows[0]["reshape"]["beta_before"], rel=0.03)


def test_fine_tuning_runs_after_each_reshape_and_moves_the_weights():
    model, data = toy_model(), toy_task()
    rows = deepshape_finetune(model, data, 1.1, 0.7, epochs=1, rounds=2, config=CFG, eval_data=data, **OPTS)
    for r in rows:
        assert r["train"]["steps"] == 3 and r["train"]["config"]["seed"] == CFG.seed + r["round"] - 1
        assert 0.0 <= r["reshaped_eval"]["accuracy"] <= 1.0
        assert "validation_accuracy" in r["train"]["history"][-1]
    # the model left is the fine-tuned one, no longer exactly the reshaped one
    after_tune = weights(model)
    reshaped = {k: reshape_values(v, 1.0, 1.0)[0] for k, v in after_tune.items()}
    assert any(not torch.equal(after_tune[k], reshaped[k]) for k in after_tune)
    assert rows[0]["reshape"]["gamma_target"] == pytest.approx(1.1 * rows[0]["reshape"]["gamma_before"], rel=0.1)


def test_summary_is_value_weighted_and_errors_are_named():
    model = toy_model()
    rows = deepshape_finetune(model, toy_task(), 1.0, 0.5, epochs=0, **OPTS)
    s = rows[0]["reshape"]
    assert s["beta_after"] == pytest.approx(s["beta_target"], rel=0.03)
    assert s["values"] == sum(w.numel() for w in weights(model).values())
    with pytest.raises(ValueError, match="rounds"):
        deepshape_finetune(model, toy_task(), 1.0, 0.5, rounds=0)
    with pytest.raises(ValueError, match="epochs"):
        deepshape_finetune(model, toy_task(), 1.0, 0.5, epochs=-1)
    with pytest.raises(ValueError, match="no reports"):
        summarize_reports([])


def test_cli_fine_tuning_needs_an_architecture_for_a_weights_file(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from ggprior.cli import app

    save_file({"w": torch.randn(64, 96)}, tmp_path / "in.safetensors")
    res = CliRunner().invoke(app, ["deepshape", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"),
                                   "--task", "spam"])
    assert res.exit_code != 0 and "needs the architecture" in res.output
    res = CliRunner().invoke(app, ["deepshape", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"),
                                   "--task", "nope", "--arch", "bert"])
    assert res.exit_code != 0 and "unknown task 'nope'" in res.output


@pytest.mark.slow
def test_cli_reshapes_and_fine_tunes_a_small_bert(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ggprior.cli import app
    from ggprior.io import save_tensors
    from ggprior.tasks import get_tokenizer
    from ggprior.tasks.models import build_model

    tok = get_tokenizer("bpe", "spam", 300)
    torch.manual_seed(0)
    model = build_model("bert", "classification", vocab_size=tok.vocab_size, max_positions=32, pad_id=tok.pad_id)
    save_tensors(model.state_dict(), tmp_path / "in.safetensors")
    res = CliRunner().invoke(app, [
        "deepshape", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--k-beta", "0.7",
        "--task", "spam", "--arch", "bert", "--vocab-size", "300", "--max-len", "32", "--max-train", "64",
        "--epochs", "1", "--rounds", "2", "--report", str(tmp_path / "rep"),
    ])
    assert res.exit_code == 0, res.output
    before, after = load_file(tmp_path / "in.safetensors"), load_file(tmp_path / "out.safetensors")
    assert set(before) == set(after)
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    assert gg.fit(after[w]).beta < 0.8 * gg.fit(before[w]).beta
    rows = (tmp_path / "rep" / "deepshape.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "validation_accuracy" in rows[0]
