"""Real checkpoints in and out: Hugging Face folders (sharded, bf16, tied weights), tokenizers, the
transformers API, format version 1 golden files, chunks and threads, and bad input."""

import errno
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ggprior
from ggprior.cli import app
from ggprior.codec import container, rans
from ggprior.codec.checkpoint import decompress
from ggprior.codec.container import ContainerError, load_compressed, read_header, save_compressed
from ggprior.codec.lengths import measure, quantized_state_dict
from ggprior.io import SourceError, open_source

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DATA = Path(__file__).parent.parent / "data"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]


def _tokenizer(folder: Path) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


def _gpt2(folder: Path) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  tie_word_embeddings=True)
    m = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()
    m.save_pretrained(folder, max_shard_size="20KB")
    _tokenizer(folder)
    return m


def _bert(folder: Path) -> "transformers.PreTrainedModel":
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    m = transformers.BertModel(cfg).to(torch.bfloat16).eval()
    m.save_pretrained(folder, max_shard_size="20KB")
    _tokenizer(folder)
    return m


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    return open_source(str(folder)).state_dict()


IDS = torch.tensor([[2, 5, 6, 7, 8, 5, 9, 3]])


@pytest.mark.parametrize("build,auto", [(_gpt2, "AutoModelForCausalLM"), (_bert, "AutoModel")])
def test_hf_folder_round_trip(tmp_path, build, auto):
    src = tmp_path / "src"
    ref = build(src)
    assert (src / "model.safetensors.index.json").is_file()  # really sharded
    ggz, out = tmp_path / "m.ggz", tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", str(src), str(ggz), "--jobs", "2"])
    assert r.exit_code == 0, r.output
    header = read_header(ggz)
    stored = {f["name"] for f in header["files"]}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= stored
    r = CliRunner().invoke(app, ["decompress", str(ggz), str(out), "--max-shard-size", "30KB"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").is_file()
    # the decoded weights are exactly the quantized source, in the source's dtype
    back, want = _folder_state(out), quantized_state_dict(str(src))
    assert set(back) == set(want)
    assert all(back[k].dtype == want[k].dtype == torch.bfloat16 and torch.equal(back[k], want[k]) for k in want)
    # transformers loads the folder as it is, and its tokenizer
    model = getattr(transformers, auto).from_pretrained(out).eval()
    tok, tok_ref = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(src)
    assert tok("the cat sat on a mat")["input_ids"] == tok_ref("the cat sat on a mat")["input_ids"]
    with torch.no_grad():
        a, b = ref(IDS)[0].float(), model(IDS)[0].float()
    assert model.dtype == torch.bfloat16
    assert float((a - b).norm() / a.norm()) < 0.05
    if auto == "AutoModelForCausalLM":  # tied: one storage, restored as such
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # ggprior.from_pretrained: the architecture from the stored config, kwargs passed on
    m2 = ggprior.from_pretrained(ggz, torch_dtype=torch.float32)
    assert type(m2).__name__ == type(ref).__name__ and m2.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(m2.eval()(IDS)[0], b, rtol=0.02, atol=0.02)


def test_pretrained_model_in_tied_weights_once_and_load_into_model(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ggz = tmp_path / "m.ggz"
    header = save_compressed(m, ggz, bits=10)
    entries = {e["name"]: e for e in header["tensors"]}
    assert entries["lm_head.weight"] == {"name": "lm_head.weight", "shape": [50, 32], "dtype": "float32",
                                         "encoding": "alias", "of": "transformer.wte.weight"}
    assert json.loads(container.Reader(ggz).files()["config.json"])["architectures"] == ["GPT2LMHeadModel"]
    # the embedding is coded once: the file is about as large as one without the head
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    alone = save_compressed(sd, tmp_path / "alone.ggz", bits=10, files={})
    side = sum(f["length"] for f in header["files"])
    assert header["file_bytes"] - alone["file_bytes"] - side < 300  # the header's alias entry and file list only
    rows, summary = measure(m, bits=10)
    assert "lm_head.weight" not in {r["name"] for r in rows}
    assert summary["weights"] == sum(v.numel() for v in sd.values() if v.dtype.is_floating_point)
    for device in (None, "meta"):  # an alias is its target's tensor object, on any device
        sd2 = load_compressed(ggz, device=device)
        assert sd2["lm_head.weight"] is sd2["transformer.wte.weight"]
    # load_compressed(model=) fills a fresh model, tied weights stay tied
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    missing, unexpected = load_compressed(ggz, model=fresh)
    assert missing == [] and unexpected == []
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    q = quantized_state_dict(m, bits=10)
    assert torch.equal(fresh.transformer.wte.weight, q["transformer.wte.weight"])
    # a file without the tied name still fills the model (as safetensors.torch.load_model)
    fresh2 = transformers.GPT2LMHeadModel(cfg).eval()
    assert load_compressed(tmp_path / "alone.ggz", model=fresh2) == ([], [])
    # strictness: a model with other names is refused, or reported with strict=False
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2,
                                                                 n_head=2, bos_token_id=0, eos_token_id=0))
    with pytest.raises(RuntimeError, match="missing keys"):
        load_compressed(ggz, model=other)
    missing, _ = load_compressed(ggz, model=other, strict=False)
    assert any(k.startswith("transformer.h.1.") for k in missing)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("coder", ["fl", "eg", "huffman", "ans", "ans-hist"])
def test_golden_files_still_read(coder, version):
    """Files written once by the version-1 and version-2 writers (tests/data; v2: chunks of 100 values, a tied
    tensor, a side file) decode to the tensors stored beside them, and v2 keeps its alias and file."""
    path = DATA / f"v{version}_{coder}.ggz"
    assert path.read_bytes()[8:12] == version.to_bytes(4, "little")
    got, want = load_compressed(path), load_file(str(DATA / f"v{version}_{coder}.decoded.safetensors"))
    assert set(got) == set(want) and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    if version == 2:
        assert got["w_tied"] is got["w"]
        assert container.Reader(path).files() == {"config.json": b'{"model_type": "golden"}\n'}


def test_chunks_and_threads_give_the_same_tensors_and_bytes(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(300, 70, generator=g) * 0.03, "v": (torch.randn(999, generator=g)).half()}
    for coder in ("ans", "ans-hist", "huffman", "eg", "fl"):
        one = save_compressed(sd, tmp_path / "a.ggz", coder=coder, chunk_values=1000, jobs=1)
        save_compressed(sd, tmp_path / "b.ggz", coder=coder, chunk_values=1000, jobs=3)
        assert (tmp_path / "a.ggz").read_bytes() == (tmp_path / "b.ggz").read_bytes()
        assert len(next(e for e in one["tensors"] if e["name"] == "w")["chunks"]) == 21
        got, want = load_compressed(tmp_path / "a.ggz", jobs=4), quantized_state_dict(sd)
        assert all(torch.equal(got[k], want[k]) for k in sd), coder


@pytest.mark.parametrize("single", [False, True])
def test_decompress_is_byte_identical_across_jobs_with_two_tensors_in_memory_at_most(tmp_path, monkeypatch, single):
    g = torch.Generator().manual_seed(6)
    sd = {f"w{i}": (torch.randn(40 + i, 50, generator=g) * 0.02).to(torch.bfloat16) for i in range(7)}
    sd["b"] = torch.randn(50, generator=g)
    save_compressed(sd, tmp_path / "m.ggz", chunk_values=512, files={"config.json": b"{}"})
    live, most, real = [0], [0], container.Reader.tensor

    def counted(self, name):  # decoded tensors alive (not yet freed) while one is written
        t = real(self, name)
        live[0] += 1
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        most[0] = max(most[0], live[0])
        return t

    monkeypatch.setattr(container.Reader, "tensor", counted)
    outs = []
    for jobs in (1, 2, 3):
        out = tmp_path / (f"o{jobs}.safetensors" if single else f"o{jobs}")
        decompress(tmp_path / "m.ggz", out, jobs=jobs, max_shard_size="12KB")
        outs.append([(p.name, p.read_bytes()) for p in sorted(out.iterdir())] if not single else out.read_bytes())
    assert outs[0] == outs[1] == outs[2] and (single or len(outs[0]) == 6)
    assert most[0] <= 2
    back = load_file(str(tmp_path / "o3.safetensors")) if single else _folder_state(tmp_path / "o3")
    want = quantized_state_dict(sd)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)


def test_ans_table_is_stored_and_integer_exact(tmp_path):
    sd = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) * 0.05}
    save_compressed(sd, tmp_path / "m.ggz", coder="ans")
    with container.Reader(tmp_path / "m.ggz") as r:
        e = r.entries["w"]
        t = e["table"]
        freqs, used = rans.unpack_freqs(r.stream(t, "table"), t["nsym"], t["prob_bits"])
        assert used == t["length"] and int(freqs.sum()) == 1 << t["prob_bits"]
        q = r.integers("w")
    # every symbol that occurs has a frequency; the stream decodes with that table alone
    assert np.all(freqs[q - t["qmin"]] > 0)


@pytest.mark.parametrize("bad,msg", [
    ({"x": torch.zeros([1] * 9)}, "at most 8 dimensions"),
    ({"": torch.zeros(3)}, "not a non-empty string"),
    ({3: torch.zeros(3)}, "not a non-empty string"),
])
def test_writer_accepts_only_what_the_reader_reads(tmp_path, bad, msg):
    with pytest.raises(ContainerError, match=msg):
        save_compressed(bad, tmp_path / "m.ggz")
    assert not list(tmp_path.iterdir())


def test_max_bytes_caps_the_decoded_size(tmp_path):
    sd = {"w": torch.randn(100, 100)}
    save_compressed(sd, tmp_path / "m.ggz")
    with pytest.raises(ContainerError, match="decodes to 40,000 bytes, more than max_bytes = 39,999"):
        load_compressed(tmp_path / "m.ggz", max_bytes=39_999)
    assert load_compressed(tmp_path / "m.ggz", max_bytes=40_000)["w"].shape == (100, 100)


def _bomb(path: Path, chunks: int) -> int:
    """A valid file whose tensor of zeros decodes to ``chunks`` x 2^24 float32 values from a few KB."""
    n = container.CHUNK_MAX
    freqs = rans.quantize_freqs(np.array([n, 0], dtype=np.int64))
    data = rans.encode(np.zeros(n, dtype=np.int32), freqs)
    table = rans.pack_freqs(freqs)
    qcrc = container.qcrc(np.zeros(n, dtype=np.int32))
    body = table + data * chunks
    entry = {"name": "z", "shape": [chunks * n], "dtype": "float32", "encoding": "quantized", "coder": "ans-hist",
             "step": 1.0, "table": {"qmin": 0, "nsym": 2, "prob_bits": rans.PROB_BITS, "offset": 0,
                                    "length": len(table), "crc32": container.crc(table)},
             "chunks": [{"n": n, "params": {}, "qcrc32": qcrc, "offset": len(table) + i * len(data),
                         "length": len(data), "crc32": container.crc(data)} for i in range(chunks)]}
    header = json.dumps({"format": container.FORMAT, "version": 2, "data_bytes": len(body), "metadata": {},
                         "tensors": [entry], "files": []}).encode()
    path.write_bytes(container.PREFIX.pack(container.MAGIC, 2, len(header), container.crc(header)) + header + body)
    return chunks * n * 4


def test_decompression_bomb_is_refused_before_allocating(tmp_path):
    """A 16 GiB tensor of zeros in 41 KB: refused by max_bytes, peak RSS of the reader stays small."""
    p = tmp_path / "bomb.ggz"
    need = _bomb(p, 256)
    assert p.stat().st_size < 64_000 and need == 1 << 34
    code = textwrap.dedent(f"""
        import resource, sys
        from ggprior.codec.container import ContainerError, load_compressed
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_compressed({str(p)!r}, max_bytes=1 << 30)
        except ContainerError as e:
            assert "more than max_bytes" in str(e), e
        else:
            sys.exit("loaded")
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    assert peak - base < 50_000  # KiB: nothing sized by the claimed 16 GiB was allocated


# ---------------------------------------------------------------------------------------------- bad input


def _one_line_error(args: list[str], *names: str) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert "Traceback" not in r.output
    text = text[text.index("error:"):]  # after any progress bar
    for name in names:
        assert name in text, text
    return text


def test_bad_folders_are_one_line_errors(tmp_path):
    src = tmp_path / "src"
    _gpt2(src)
    out = tmp_path / "o.ggz"
    index = src / "model.safetensors.index.json"
    good_index = index.read_text()
    # a broken shard index
    index.write_text("{not json")
    _one_line_error(["compress", str(src), str(out)], "model.safetensors.index.json", "broken shard index")
    # an index naming a tensor its shard does not hold
    wm = json.loads(good_index)
    wm["weight_map"]["extra.weight"] = next(iter(wm["weight_map"].values()))
    index.write_text(json.dumps(wm))
    _one_line_error(["compress", str(src), str(out)], "model.safetensors.index.json", "extra.weight")
    # a shard missing
    index.write_text(good_index)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "away.safetensors")
    _one_line_error(["compress", str(src), str(out)], shard.name, "is missing")
    # a config-only folder, and a folder without weights
    for f in src.glob("model*"):
        f.unlink()
    _one_line_error(["compress", str(src), str(out)], str(src), "config.json but no weights")
    (src / "config.json").unlink()
    _one_line_error(["compress", str(src), str(out)], str(src), "no weights")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shared_tensor_with_two_shapes_is_refused(tmp_path):
    base = torch.randn(4, 6)
    pt = tmp_path / "shared.pt"
    torch.save({"a": base, "b": base.view(6, 4)}, pt)
    _one_line_error(["compress", str(pt), str(tmp_path / "o.ggz")], "shared.pt", "'a'", "'b'", "share memory")
    assert not (tmp_path / "o.ggz").exists()
    with pytest.raises(SourceError, match="share memory"):
        save_compressed({"a": base, "b": base.view(6, 4)}, tmp_path / "o.ggz")


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path):
    sd = {"w": torch.randn(8, 8)}
    save_compressed(sd, tmp_path / "m.ggz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(["decompress", str(tmp_path / "m.ggz"), str(out)], str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="already exists"):
        decompress(tmp_path / "m.ggz", out)
    r = CliRunner().invoke(app, ["decompress", str(tmp_path / "m.ggz"), str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ggz", "out"]


@pytest.mark.parametrize("single", [False, True])
def test_disk_full_mid_write_leaves_nothing_at_the_final_path(tmp_path, monkeypatch, single):
    g = torch.Generator().manual_seed(5)
    sd = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(4)}
    save_compressed(sd, tmp_path / "m.ggz")
    from ggprior.io import tensors

    real = tensors.SafetensorsWriter.write
    calls = []

    def full(self, name, t):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, t)

    monkeypatch.setattr(tensors.SafetensorsWriter, "write", full)
    out = tmp_path / ("out.safetensors" if single else "out")
    _one_line_error(["decompress", str(tmp_path / "m.ggz"), str(out), "--max-shard-size", "5KB"],
                    str(out), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ggz"]


def test_disk_full_while_compressing(tmp_path, monkeypatch):
    sd = {"w": torch.randn(64, 64)}
    src = tmp_path / "s.safetensors"
    save_file(sd, str(src))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shutil.copyfileobj", full)
    _one_line_error(["compress", str(src), str(tmp_path / "o.ggz")], "o.ggz", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
