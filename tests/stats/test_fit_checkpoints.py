"""``ggprior fit`` on checkpoints as users bring them: console tables at any width, --json, and
--activations/--gradients on any Hugging Face folder with its tokenizer (issue 12)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from ggprior import gg
from ggprior.cli import app
from ggprior.io.tables import to_text
from ggprior.stats import MODEL_ROW, fit_model

LINES = ["the cat sat on the mat", "a dog ran in the park", "money for nothing and chips for free",
         "the dog sat in the sun", "a cat ran on the mat"]


def _tokenizer(folder, *, encoder: bool) -> int:
    """A WordLevel tokenizer trained on LINES, saved the transformers way; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[MASK]"] if encoder else ["<unk>", "<eos>"]
    tk = Tokenizer(models.WordLevel(unk_token=specials[0] if not encoder else "[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=specials))
    kw = dict(pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]") if encoder else dict(
        unk_token="<unk>", eos_token="<eos>")  # GPT-2 style: no pad token
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    tok.save_pretrained(folder)
    return tok.vocab_size


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    bert = tmp_path_factory.mktemp("tiny-bert")
    v = _tokenizer(bert, encoder=True)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=v, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32)).save_pretrained(bert)
    gpt2 = tmp_path_factory.mktemp("tiny-gpt2")
    v = _tokenizer(gpt2, encoder=False)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(gpt2)
    text = tmp_path_factory.mktemp("text") / "lines.txt"
    text.write_text("\n".join(LINES * 4) + "\n\n")
    return {"bert": bert, "gpt2": gpt2, "text": text}


# ---------------------------------------------------------------- console tables

cell = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=False, width=64), st.text("abc_:.", max_size=30))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({c: cell for c in "abcdef"}), min_size=1, max_size=5),
       st.integers(10, 200))
def test_to_text_fits_the_width_and_keeps_every_cell_whole(rows, width):
    cols = list("abcdef")
    text = to_text(rows, cols, width)
    lines = text.splitlines()
    header = lines[0].split()
    shown = cols[: len(header)]
    assert header == shown and "…" not in text
    if len(shown) > 1:
        assert max(len(x) for x in lines[:-1] if not x.startswith("(not shown")) <= width
    if len(shown) < len(cols):
        assert lines[-1] == f"(not shown at width {width}: {', '.join(cols[len(shown):])})"
    body = lines[2: 2 + len(rows)]
    for r, line in zip(rows, body, strict=True):
        for c in shown:
            v = r[c]
            s = f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else v)
            assert s in line


def _checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({"encoder.layer.0.attention.self.query.weight": gg.sample((64, 48), 0, 0.05, 1.2, generator=g),
               "encoder.layer.0.intermediate.dense.weight": gg.sample((96, 48), 0, 0.05, 0.8, generator=g),
               "encoder.layer.0.output.LayerNorm.weight": 1 + 0.01 * torch.randn(48, generator=g)}, str(path))
    return path


@pytest.mark.parametrize("width", [30, 60, 80, 250])
def test_cli_fit_table_fits_any_width_and_never_cuts_numbers(tmp_path, width):
    path = _checkpoint(tmp_path)
    res = CliRunner().invoke(app, ["fit", str(path), str(tmp_path / "out")], env={"COLUMNS": str(width)})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    rows = json.loads((tmp_path / "out" / "fit.json").read_text())
    model = next(r for r in rows if r["name"] == MODEL_ROW)
    assert f"{model['numel']:,}" in res.stderr  # the name and numel columns are always there, whole
    table = [x for x in res.stderr.splitlines() if x.startswith(("name", "__", "group:", "-"))]
    assert table and all(len(x) <= max(width, 40) for x in table)
    if width == 250:
        assert "(not shown" not in res.stderr and f"{model['ks_gauss']:.4g}" in res.stderr


def test_cli_fit_json_on_stdout_matches_the_files(tmp_path):
    path = _checkpoint(tmp_path)
    res = CliRunner().invoke(app, ["fit", str(path), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows == json.loads((tmp_path / "out" / "fit.json").read_text())
    assert rows == fit_model(path, progress=False)


def test_fit_model_pools_match_a_direct_fit_of_the_concatenation(tmp_path):
    path = _checkpoint(tmp_path)
    rows = {r["name"]: r for r in fit_model(path, progress=False, gof=False)}
    from safetensors.torch import load_file

    every = torch.cat([t.reshape(-1) for t in load_file(str(path)).values()])
    direct = gg.fit(every)
    assert rows[MODEL_ROW]["gamma"] == pytest.approx(direct.gamma, rel=1e-9)
    assert rows[MODEL_ROW]["beta"] == pytest.approx(direct.beta, rel=1e-9)


def test_goodness_of_fit_sample_is_bounded(tmp_path):
    x = gg.sample((300_000,), 0, 0.05, 1.2, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "big.safetensors"
    save_file({"w.weight": x.reshape(600, 500)}, str(path))
    samples = {}
    fit_model(path, progress=False, max_gof_values=1000, pool_samples=samples)
    assert 0 < samples[MODEL_ROW].numel() <= 1000 + 1


# ---------------------------------------------------------------- activations and gradients of HF folders

@pytest.mark.parametrize("model,block", [("bert", "bert.encoder.layer.1"), ("gpt2", "transformer.h.1")])
def test_fit_activations_gradients_on_a_hf_folder_with_a_text_file(hf_folders, tmp_path, model, block):
    import transformers

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["fit", str(hf_folders[model]), str(out), "--activations", "--gradients",
                                   "--text", str(hf_folders["text"]), "--examples", "12", "--batch-size", "5",
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    names = {r["name"] for r in rows}
    assert {"__activations__", "__gradients__", block} <= names
    assert "12 examples" in (out / "fit_activations_gradients.md").read_text()
    auto = transformers.AutoModelForMaskedLM if model == "bert" else transformers.AutoModelForCausalLM
    params = dict(auto.from_pretrained(hf_folders[model]).named_parameters())  # a tied weight once
    grads = {r["name"]: r for r in rows if r["kind"] == "gradients" and not r["name"].startswith(("__", "group:"))}
    assert set(grads) <= set(params) and len(grads) >= len(params) - 2
    for name, r in grads.items():  # three batches (5 + 5 + 2 examples), each a full gradient
        assert r["numel"] == 3 * params[name].numel()


def test_fit_activations_on_a_builtin_task_bounded_examples(hf_folders, tmp_path):
    res = CliRunner().invoke(app, ["fit", str(hf_folders["gpt2"]), str(tmp_path / "o"), "--activations",
                                   "--task", "spam", "--examples", "6", "--json"])
    assert res.exit_code == 0, res.output
    pool = next(r for r in json.loads(res.stdout) if r["name"] == "__activations__")
    assert pool["numel"] > 0
    assert "spam (6 examples)" in (tmp_path / "o" / "fit_activations.md").read_text()


def test_fit_runtime_bad_input_is_one_line(hf_folders, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    weights_only = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(weights_only))
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):  # weights but no tokenizer files
        (no_tok / f).write_bytes((hf_folders["bert"] / f).read_bytes())
    cases = [
        ([str(weights_only), "--activations"], "not a Hugging Face model folder"),
        ([str(hf_folders["bert"]), "--gradients", "--text", str(tmp_path / "empty.txt")], "no non-empty line"),
        ([str(hf_folders["bert"]), "--gradients", "--text", str(tmp_path / "missing.txt")], "missing.txt"),
        ([str(no_tok), "--activations"], "no tokenizer files"),
        ([str(hf_folders["gpt2"]), "--activations", "--task", "nope"], "unknown task 'nope'"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        res = CliRunner().invoke(app, ["fit", args[0], str(out), *args[1:]])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert [x for x in res.output.splitlines() if "error" in x.lower()] == [res.output.strip().splitlines()[-1]]
        assert not out.exists()
