"""Sensitivity weights from the Fisher of a model's own outputs, on a Hugging Face folder and calibration text,
and ``ggprior compress --calibration``."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from ggprior.cli import app
from ggprior.codec import read_header
from ggprior.codec.allocate import AllocationError
from ggprior.codec.sensitivity import calibration_weights, sensitivity_weights
from ggprior.tasks.data import DataError, calibration_texts

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
TEXT = "the cat sat on the mat . a dog ran far on a mat . " * 40


class _Head(nn.Module):
    """``W x`` for one fixed ``x`` repeated ``n`` times: as logits (``.logits``) or as a hidden state (a tensor)."""

    def __init__(self, logits: bool):
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)
        self.logits = logits

    def forward(self, x, attention_mask=None):
        y = self.lin(x)
        return SimpleNamespace(logits=y) if self.logits else y


X = torch.tensor([0.5, -1.0, 2.0])


def test_fisher_of_categorical_logits_matches_closed_form():
    # one position: d log p_y / dW_cj = (1[y=c] - p_c) x_j, so with y drawn from p the Fisher is p_c (1 - p_c) x_j^2;
    # a batch of n identical positions sums n independent draws: n times that
    torch.manual_seed(0)
    m = _Head(logits=True)
    n, batches = 64, 300
    xs = [{"x": X.expand(n, 3).clone()} for _ in range(batches)]
    got = sensitivity_weights(m, xs, kind="fisher")["lin.weight"]
    with torch.no_grad():
        p = torch.softmax(m.lin(X), -1)
    want = float(n * (p * (1 - p))[:, None].mul(X.pow(2)[None, :]).mean())
    assert got == pytest.approx(want, rel=0.12)


def test_fisher_of_a_hidden_state_is_its_input_power_and_respects_the_mask():
    # a Gaussian probe r on y = W x: d(r . y)/dW_cj = r_c x_j, whose square has mean x_j^2 at each position
    torch.manual_seed(0)
    m = _Head(logits=False)
    x = X.expand(2, 5, 3).clone()  # (batch, positions, features)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    batches = [{"x": x, "attention_mask": mask} for _ in range(400)]
    got = sensitivity_weights(m, batches, kind="fisher")["lin.weight"]
    assert got == pytest.approx(int(mask.sum()) * float(X.pow(2).mean()), rel=0.12)
    none = sensitivity_weights(m, [{"x": x, "attention_mask": torch.zeros_like(mask)}], kind="fisher")
    assert none["lin.weight"] == 0.0


def test_fisher_is_seeded_and_rejects_a_loss():
    m = _Head(logits=True)
    b = [{"x": torch.randn(8, 3, generator=torch.Generator().manual_seed(1))}] * 3
    assert sensitivity_weights(m, b, kind="fisher", seed=3) == sensitivity_weights(m, b, kind="fisher", seed=3)
    assert sensitivity_weights(m, b, kind="fisher", seed=3) != sensitivity_weights(m, b, kind="fisher", seed=4)
    with pytest.raises(AllocationError, match="loss_fn"):
        sensitivity_weights(m, b, kind="fisher", loss_fn=lambda mm, bb: mm(**bb).logits.sum())
    with pytest.raises(AllocationError, match="'fisher', 'grad2' or 'act'"):
        sensitivity_weights(m, b, kind="hessian")


def _tokenizer(folder: Path) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                                  special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


@pytest.fixture
def gpt2_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  tie_word_embeddings=True)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    _tokenizer(folder)
    return folder


@pytest.fixture
def bert_folder(tmp_path) -> Path:
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=24)
    folder = tmp_path / "bert"
    transformers.BertModel(cfg).save_pretrained(folder)
    _tokenizer(folder)
    return folder


def test_calibration_weights_of_a_causal_lm_and_an_encoder(gpt2_folder, bert_folder):
    from safetensors import safe_open

    for folder in (gpt2_folder, bert_folder):
        w = calibration_weights(folder, [TEXT], tokens=100, block=64)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert set(w) == set(f.keys())
        vals = np.array(list(w.values()))
        assert np.all(np.isfinite(vals)) and np.all(vals > 0)
        assert w == calibration_weights(folder, [TEXT], tokens=100, block=64)  # seeded
    # the encoder's block is capped at its 24 positions; weights move with the text the model sees
    w1 = calibration_weights(gpt2_folder, [TEXT], tokens=100, block=64)
    w2 = calibration_weights(gpt2_folder, ["a dog ran far . " * 40], tokens=100, block=64)
    assert w1 != w2


def test_calibration_channel_scales_of_a_causal_lm_and_an_encoder(gpt2_folder, bert_folder, monkeypatch):
    from ggprior.codec import channels
    from ggprior.codec.channels import COARSER, ChannelScales

    # every matrix of these 32-wide models is too small to pay for its codes: no scales
    assert calibration_weights(gpt2_folder, [TEXT], tokens=100, block=64, channels=True)[1] == {}
    monkeypatch.setattr(channels, "worth_scaling", lambda shape: len(shape) >= 2)
    for folder in (gpt2_folder, bert_folder):
        plain = calibration_weights(folder, [TEXT], tokens=100, block=64)
        w, scales = calibration_weights(folder, [TEXT], tokens=100, block=64, channels=True)
        assert set(w) == set(plain) and scales and set(scales) <= set(w)
        assert all(isinstance(s, ChannelScales) and s.rows.size > 1 for s in scales.values())
        assert any(w[k] != plain[k] for k in scales)  # the weights of the scaled tensors
        assert all(w[k] == plain[k] for k in w if k not in scales)
    # the encoder's word embeddings: rows of tokens the text never uses get the mean sensitivity's code
    emb = scales["embeddings.word_embeddings.weight"]
    unused = [WORDS.index("[PAD]"), WORDS.index("[MASK]")]  # ("." is [UNK]; [CLS], [SEP] wrap each block)
    assert len({int(emb.rows[i]) for i in unused}) == 1
    assert emb.rows[unused[0]] < round(8 * COARSER)  # not the coarsest step, as a zero Fisher would give


def test_calibration_weights_errors(tmp_path, gpt2_folder):
    with pytest.raises(AllocationError, match="no tokens"):
        calibration_weights(gpt2_folder, [""], tokens=100)
    (tmp_path / "bare").mkdir()
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "bare" / "model.safetensors"))
    with pytest.raises(AllocationError, match="bare: cannot build the model"):
        calibration_weights(tmp_path / "bare", [TEXT])


def test_calibration_texts(tmp_path):
    ok = tmp_path / "c.txt"
    ok.write_text("some text\n", encoding="utf-8")
    assert calibration_texts(str(ok)) == ["some text\n"]
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="b.txt: calibration text is not UTF-8"):
        calibration_texts(str(bad))
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="e.txt: calibration text is empty"):
        calibration_texts(str(empty))
    with pytest.raises(DataError, match="no such file, and not a corpus"):
        calibration_texts(str(tmp_path / "missing.txt"))


def _steps(path: Path) -> dict[str, float]:
    return {e["name"]: e["step"] for e in read_header(path)["tensors"] if e["encoding"] == "quantized"}


def test_cli_compress_calibrates_a_model_folder(tmp_path, gpt2_folder):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    run = CliRunner().invoke
    r = run(app, ["compress", str(gpt2_folder), str(tmp_path / "c.ggz"), "--target-bits", "4", "--select", "matrices",
                  "--calibration", str(text), "--calibration-tokens", "200"])
    assert r.exit_code == 0, r.output
    assert "allocation weighted by the model's Fisher information on" in " ".join(r.output.split())
    r = run(app, ["compress", str(gpt2_folder), str(tmp_path / "u.ggz"), "--target-bits", "4", "--select", "matrices",
                  "--calibration", "none"])
    assert r.exit_code == 0, r.output
    assert "every tensor weighs the same in the allocation (--calibration none)" in " ".join(r.output.split())
    calibrated, uniform = _steps(tmp_path / "c.ggz"), _steps(tmp_path / "u.ggz")
    assert set(calibrated) == set(uniform) and calibrated != uniform
    # the allocation is weighted: the step ratio between two tensors moves with their sensitivities
    w = calibration_weights(gpt2_folder, [TEXT], tokens=200)
    a, b = max(calibrated, key=w.get), min(calibrated, key=w.get)
    assert calibrated[a] / calibrated[b] < uniform[a] / uniform[b]


def test_cli_channel_scales(tmp_path, gpt2_folder, monkeypatch):
    from ggprior.codec import channels

    monkeypatch.setattr(channels, "worth_scaling", lambda shape: len(shape) >= 2)  # the tiny model's matrices
    run = CliRunner().invoke
    args = [str(gpt2_folder), "--target-bits", "4", "--select", "matrices", "--calibration-tokens", "200"]
    r = run(app, ["compress", args[0], str(tmp_path / "s.ggz"), *args[1:]])
    assert r.exit_code == 0, r.output
    assert "steps shaped per row and column" in " ".join(r.output.split())
    h = read_header(tmp_path / "s.ggz")
    assert h["version"] == 3 and any("channel_scales" in e for e in h["tensors"])
    r = run(app, ["compress", args[0], str(tmp_path / "n.ggz"), *args[1:], "--no-channel-scales"])
    assert r.exit_code == 0, r.output
    h = read_header(tmp_path / "n.ggz")
    assert h["version"] == 2 and not any("channel_scales" in e for e in h["tensors"])
    out = tmp_path / "x.ggz"
    r = run(app, ["compress", args[0], str(out), "--rel-error", "0.01", "--channel-scales"])
    assert r.exit_code != 0 and "--channel-scales shape the allocation" in r.output and not out.exists()
    r = run(app, ["compress", args[0], str(out), "--target-bits", "4", "--calibration", "none", "--channel-scales"])
    assert r.exit_code != 0 and "--calibration none turns off" in " ".join(r.output.split()) and not out.exists()
    bare = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(bare))
    r = run(app, ["compress", str(bare), str(out), "--target-bits", "4", "--channel-scales"])
    assert r.exit_code != 0 and "needs a model folder" in " ".join(r.output.split()) and not out.exists()


def test_cli_calibration_errors(tmp_path, gpt2_folder):
    run = CliRunner().invoke
    out = tmp_path / "x.ggz"
    r = run(app, ["compress", str(gpt2_folder), str(out), "--bits", "8", "--calibration", "bbc-lm"])
    assert r.exit_code != 0 and "--calibration weighs the allocation" in r.output and not out.exists()
    r = run(app, ["compress", str(gpt2_folder), str(out), "--target-bits", "4", "--calibration",
                  str(tmp_path / "nope.txt")])
    assert r.exit_code != 0 and "nope.txt" in r.output and not out.exists()
    bare = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(bare))
    r = run(app, ["compress", str(bare), str(out), "--target-bits", "4", "--calibration", "bbc-lm"])
    assert r.exit_code != 0 and "needs a Hugging Face folder" in r.output and not out.exists()
    r = run(app, ["compress", str(bare), str(out), "--target-bits", "4"])  # no model to run: uniform, said so
    assert r.exit_code == 0 and "is not a model folder" in " ".join(r.output.split()) and out.exists()


def test_calibration_of_a_model_that_cannot_run_on_text_alone(tmp_path):
    # an encoder-decoder wants decoder inputs: a one-line error naming the folder, not a traceback
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    folder = tmp_path / "t5"
    transformers.T5Model(cfg).save_pretrained(folder)
    _tokenizer(folder)
    with pytest.raises(AllocationError, match=r"t5: running the T5Model on calibration text failed .*--calibration none"):
        calibration_weights(folder, [TEXT], tokens=50)
