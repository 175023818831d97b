"""The whole framework end to end on one task: ``ggprior pipeline``.

Stages, each cached under ``out/`` (a stage whose inputs did not change is not run again, so
an interrupted run resumes; training also resumes mid-run from its epoch checkpoints):

1. ``stats``: GG statistics of the pretrained model (MiniLM by default; ``ggprior fit``).
2. ``train``: a small BERT-style model trained on the task twice from the same seed:
   He init + plain training (the baseline), and GG init + BackSlash (rate-constrained).
3. ``deepshape``: DeepShape on both trained models, then a short plain fine-tune.
4. ``compress``: every variant quantized per tensor on the paper's FL = 10-bit grid and written
   as ``.ggz`` files with every coder (FL, Exp-Golomb, Huffman, ANS under the GG model), plus
   zstd-19 of the same integers as a general-purpose baseline; the files are read back and the
   decoded model evaluated.
5. ``formats``: every variant in RF8 (truncating and round-to-nearest), FP16, BF16, FP8 and int8,
   each saved as a file and evaluated.
6. ``report``: ``report.md`` and a self-contained ``report.html`` with the summary table
   (variant, format, accuracy, bits/weight, file size, CR(EG), CR(HM)) and the plots.

Sizes and bits/weight are those of the real files on disk divided by the number of floating
values in the model (every tensor, norms and biases included), so every row is comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_model, save_model
from torch import nn

from .. import formats, stats
from ..codec import container, lengths, registry
from ..deepshape import BIN_WIDTH, reshape_model_
from ..io.atomic import atomic_path, write_text
from ..io.tensors import floating_values
from ..tasks import data, models
from ..tasks.tokenizer import TextTokenizer, get_tokenizer
from ..train import TrainConfig, evaluate, make_rate_callback, train

VARIANTS = ("he-plain", "gg-backslash", "he-plain+deepshape", "gg-backslash+deepshape")
CODERS = tuple(c for c in registry.CODERS if c != "ans-hist")  # the coded files the pipeline writes
FORMATS = ("fp16", "bf16", "fp8-e4m3", "fp8-e4m3-scaled", "int8", "rf8", "rf8-round")
SIZES = ("default", "tiny")
FIXED_STEP = 2.0**-8  # the studies' fixed grid (docs/results): code lengths reported beside the per-tensor one


class PipelineError(ValueError):
    """Bad pipeline settings."""


@dataclass
class PipelineConfig:
    """Everything the pipeline's results depend on (see the module docstring).

    ``size="tiny"`` is a seconds-long smoke run (a few hundred examples, one epoch).
    """

    task: str = "sentiment"
    arch: str = "bert"
    scale: int = 1
    vocab_size: int = 4096
    max_len: int = 64
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    gamma: float = 0.1
    lam: float = 300.0
    backslash_epochs: int = 2
    k_gamma: float = 1.1
    k_beta: float = 0.7
    finetune_epochs: int = 1
    bits: int = 10
    pretrained: str = "minilm"
    gof_values: int = 1 << 18
    max_examples: int | None = None
    seed: int = 0
    device: str = "cpu"
    coders: tuple[str, ...] = CODERS
    formats: tuple[str, ...] = FORMATS

    @classmethod
    def preset(cls, size: str = "default", **overrides) -> PipelineConfig:
        """The ``default`` or ``tiny`` configuration with ``overrides`` applied."""
        if size not in SIZES:
            raise PipelineError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
        base = cls()
        if size == "tiny":
            base = replace(base, vocab_size=512, max_len=32, epochs=1, backslash_epochs=1, max_examples=96,
                           gof_values=1 << 12, batch_size=32)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "epochs" in given and "backslash_epochs" not in given:
            given["backslash_epochs"] = min(base.backslash_epochs, given["epochs"])
        cfg = replace(base, **given)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.task not in data.TASKS:
            raise PipelineError(f"unknown task {self.task!r}; known: {', '.join(data.TASKS)}")
        if self.arch not in ("bert", "gpt2", "llama"):
            raise PipelineError(f"arch must be bert, gpt2 or llama, got {self.arch!r}")
        if self.epochs < 1 or self.finetune_epochs < 0 or not 0 <= self.backslash_epochs <= self.epochs:
            raise PipelineError(f"need epochs >= 1, finetune_epochs >= 0, 0 <= backslash_epochs <= epochs: {self}")
        if not (self.gamma > 0 and self.lam >= 0 and self.k_gamma > 0 and self.k_beta > 0):
            raise PipelineError("gamma, k_gamma and k_beta must be positive and lam non-negative")
        if not 2 <= self.bits <= 16:
            raise PipelineError(f"bits must be in [2, 16], got {self.bits}")
        unknown = [f for f in self.formats if f not in formats.FORMATS]
        if unknown:
            raise PipelineError(f"unknown format(s) {', '.join(unknown)}")


@dataclass
class Context:
    """What the stages share: settings, output folder, data, console."""

    cfg: PipelineConfig
    out: Path
    console: Console
    progress: bool = True
    tokenizer: TextTokenizer | None = None
    splits: dict[str, data.TaskData] = field(default_factory=dict)

    def model_path(self, variant: str) -> Path:
        return self.out / "models" / f"{variant}.safetensors"

    def load_data(self) -> None:
        if self.splits:
            return
        c = self.cfg
        self.tokenizer = get_tokenizer("bpe", c.task, c.vocab_size)
        for split in data.SPLITS:
            limit = None if c.max_examples is None else (c.max_examples if split == "train" else c.max_examples // 2)
            self.splits[split] = data.load_task(c.task, split, self.tokenizer, c.max_len, max_examples=limit)

    def new_model(self) -> nn.Module:
        self.load_data()
        c = self.cfg
        return models.build_model(c.arch, "classification", vocab_size=self.tokenizer.vocab_size,
                                  num_labels=self.splits["train"].num_labels, pad_id=self.tokenizer.pad_id,
                                  max_positions=max(64, c.max_len), scale=c.scale)

    def load_variant(self, variant: str) -> nn.Module:
        model = self.new_model()
        load_model(model, str(self.model_path(variant)), strict=True, device=self.cfg.device)
        return model.to(self.cfg.device)

    def accuracy(self, model: nn.Module) -> float:
        self.load_data()
        return evaluate(model.to(self.cfg.device), self.splits["test"])["accuracy"]


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(ctx: Context, name: str, key_obj: object, fn: Callable[[], dict]) -> dict:
    """Run ``fn`` unless ``out/stages/<name>.json`` holds a result for the same inputs."""
    path = ctx.out / "stages" / f"{name}.json"
    key = _key(key_obj)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            ctx.console.print(f"· {name}: cached", style="dim", markup=False)
            return saved["result"]
    ctx.console.print(f"▶ {name}", style="bold", markup=False)
    t0 = time.perf_counter()
    result = fn()
    result["seconds"] = time.perf_counter() - t0
    write_text(path, json.dumps({"key": key, "result": result}, indent=1, default=float) + "\n")
    ctx.console.print(f"  {name} done in {result['seconds']:.1f} s", markup=False)
    return result


def _save(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def _float_values(model: nn.Module) -> int:
    return floating_values(model.state_dict())


# ---------------------------------------------------------------- stages

def stage_stats(ctx: Context) -> dict:
    """GG fit of the pretrained model: the pooled and group rows, plus a plot of the linear weights."""
    c = ctx.cfg

    def run() -> dict:
        from ..io.tables import write_table
        from ..report.plots import plot_fit

        samples: dict[str, torch.Tensor] = {}
        rows = stats.fit_model(c.pretrained, max_gof_values=c.gof_values, seed=c.seed, progress=ctx.progress,
                               pool_samples=samples)
        folder = ctx.out / "stats"
        write_table(rows, folder, "fit", title=f"GG fit of {c.pretrained}")
        pooled = [r for r in rows if r["name"].startswith(("__", "group:"))]
        lin = next((r for r in pooled if r["name"] == stats.LINEAR_ROW and "gamma" in r), None)
        if lin is not None and stats.LINEAR_ROW in samples:
            from ..gg import GGFit

            fit = GGFit(mu=lin["mu"], beta=lin["beta"], gamma=lin["gamma"], n=lin["numel"], std=lin["std"],
                        ratio=float("nan"), at_bound=lin["gamma_at_bound"], method=lin["fit_method"])
            plot_fit(samples[stats.LINEAR_ROW], fit, ctx.out / "plots" / "pretrained_fit.png",
                     title=f"{c.pretrained}: linear weights pooled")
        return {"source": c.pretrained, "pooled": pooled}

    return _cached(ctx, "stats", {"pretrained": c.pretrained, "gof": c.gof_values, "seed": c.seed}, run)


def _train_key(c: PipelineConfig, variant: str) -> dict:
    """The settings a trained variant depends on (the BackSlash ones only for ``gg-backslash``)."""
    key = {k: getattr(c, k) for k in ("task", "arch", "scale", "vocab_size", "max_len", "epochs", "batch_size",
                                      "lr", "seed", "max_examples")}
    if variant == "gg-backslash":
        key.update(gamma=c.gamma, lam=c.lam, bs=c.backslash_epochs)
    return key


def stage_train(ctx: Context, variant: str) -> dict:
    """Train ``he-plain`` (He init, plain) or ``gg-backslash`` (GG init, BackSlash) from the same seed."""
    c = ctx.cfg
    gg = variant == "gg-backslash"
    key = {**_train_key(c, variant), "variant": variant}

    def run() -> dict:
        ctx.load_data()
        torch.manual_seed(c.seed)
        model = ctx.new_model()
        models.initialize_(model, "gg" if gg else "he", c.gamma, generator=torch.Generator().manual_seed(c.seed))
        callbacks = []
        if gg:
            cb = make_rate_callback("backslash", c.lam, epochs=c.backslash_epochs)
            callbacks = [cb] if cb is not None else []
        cfg = TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device,
                          progress=ctx.progress)
        folder = ctx.out / "train" / variant
        stamp = folder / "inputs.key"
        if folder.exists() and (not stamp.is_file() or stamp.read_text() != _key(key)):
            shutil.rmtree(folder)  # a checkpoint of other settings: never resume it
        write_text(stamp, _key(key))
        metrics = train(model, ctx.splits["train"], ctx.splits["validation"], cfg, callbacks, out_dir=folder,
                        resume=True, test_data=ctx.splits["test"])
        _save(model, ctx.model_path(variant))
        return {"variant": variant, "accuracy": metrics["test"]["accuracy"], "train_seconds": metrics["seconds"],
                "history": metrics["history"], "parameters": models.count_parameters(model)}

    return _cached(ctx, f"train-{variant}", key, run)


def stage_deepshape(ctx: Context, base: str) -> dict:
    """DeepShape (K_gamma, K_beta) on a trained variant, then ``finetune_epochs`` of plain training."""
    c = ctx.cfg
    variant = f"{base}+deepshape"
    key = {**_train_key(c, base), "base": base, "k_gamma": c.k_gamma, "k_beta": c.k_beta, "ft": c.finetune_epochs}

    def run() -> dict:
        model = ctx.load_variant(base)
        # per tensor on the paper's grid (2^-13), else on one 16x finer; a tensor neither grid can reshape is
        # left as it is, with the reason (BackSlash leaves cores narrower than the paper's bins)
        shaped = reshape_model_(model, c.k_gamma, c.k_beta, select="matrices", fallback_widths=(BIN_WIDTH / 16,),
                                skip_unshapeable=True)
        fits = [{**r.to_row(), "bin_width": r.bin_width} for r in shaped.reports]
        skipped = shaped.skipped
        acc_reshaped = ctx.accuracy(model)
        history = []
        if c.finetune_epochs:
            cfg = TrainConfig(epochs=c.finetune_epochs, batch_size=c.batch_size, lr=c.lr / 10, seed=c.seed + 1,
                              device=c.device, progress=ctx.progress)
            history = train(model, ctx.splits["train"], ctx.splits["validation"], cfg)["history"]
        _save(model, ctx.model_path(variant))
        return {"variant": variant, "accuracy_reshaped": acc_reshaped, "accuracy": ctx.accuracy(model),
                "history": history, "tensors": fits, "skipped": skipped}

    return _cached(ctx, f"deepshape-{base}", key, run)


def stage_compress(ctx: Context, variant: str, upstream: str) -> dict:
    """``.ggz`` files with every coder, zstd of the same integers, code-length measurement, accuracy."""
    c = ctx.cfg
    key = {"upstream": upstream, "bits": c.bits, "coders": list(c.coders), "fixed_step": FIXED_STEP}

    def run() -> dict:
        import zstandard

        model = ctx.load_variant(variant)
        n = _float_values(model)
        folder = ctx.out / "files"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        decoded = None
        for coder in c.coders:
            path = folder / f"{variant}.{coder}.ggz"
            container.save_compressed(model, path, coder=coder, bits=c.bits, files={})  # weights only, like the other formats
            sd = container.load_compressed(path)
            if decoded is None:
                decoded = sd
            elif any(not torch.equal(decoded[k], sd[k]) for k in decoded):
                raise PipelineError(f"{path}: decodes to different weights than the {c.coders[0]} file")
            rows.append({"format": f"ggz-{coder}", "file": path.name, "bytes": path.stat().st_size})
        ints = container.load_integers(folder / f"{variant}.{c.coders[0]}.ggz")
        raw = np.concatenate([q.numpy().astype(np.int16).ravel() for q, _ in ints.values()])
        exact = sum(t.nbytes for k, t in decoded.items() if k not in ints)
        zbytes = len(zstandard.ZstdCompressor(level=19).compress(raw.tobytes())) + exact + 4 * len(ints)
        rows.append({"format": "zstd-19", "file": None, "bytes": zbytes})
        quantized = ctx.new_model()
        quantized.load_state_dict(decoded, strict=True)
        acc = ctx.accuracy(quantized)
        _, summary = lengths.measure(model, bits=c.bits, coders=("fl", "eg", "huffman", "entropy", "ans"))
        _, fixed = lengths.measure(model, step=FIXED_STEP, include="matrices", coders=("fl", "eg", "huffman"))
        for r in rows:
            r.update(accuracy=acc, bits_per_weight=8 * r["bytes"] / n)
        return {"variant": variant, "weights": n, "accuracy": acc, "rows": rows,
                "cr_eg": summary["cr_eg"], "cr_huffman": summary["cr_huffman"],
                "fixed_step": {"step": FIXED_STEP, "cr_eg": fixed["cr_eg"], "cr_huffman": fixed["cr_huffman"],
                               "bpw_eg": fixed["bpw_eg"], "bpw_huffman": fixed["bpw_huffman"]},
                "bpw": {k: summary[f"bpw_{k}"] for k in ("fl", "eg", "huffman", "entropy", "ans")}}

    return _cached(ctx, f"compress-{variant}", key, run)


def stage_formats(ctx: Context, variant: str, upstream: str) -> dict:
    """The variant stored in fp32 and in every 8/16-bit format: file size and accuracy."""
    c = ctx.cfg
    key = {"upstream": upstream, "formats": list(c.formats)}

    def run() -> dict:
        model = ctx.load_variant(variant)
        n = _float_values(model)
        folder = ctx.out / "files"
        rows = [{"format": "fp32", "file": ctx.model_path(variant).name, "bytes": ctx.model_path(variant).stat().st_size,
                 "accuracy": ctx.accuracy(model)}]
        for fmt in c.formats:
            path = folder / f"{variant}.{fmt}.safetensors"
            formats.save_quantized(model, path, fmt)
            stored = ctx.new_model()
            stored.load_state_dict(formats.load_quantized(path), strict=True)
            rows.append({"format": fmt, "file": path.name, "bytes": path.stat().st_size,
                         "accuracy": ctx.accuracy(stored)})
        for r in rows:
            r["bits_per_weight"] = 8 * r["bytes"] / n
        return {"variant": variant, "weights": n, "rows": rows}

    return _cached(ctx, f"formats-{variant}", key, run)


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike, *, console: Console | None = None,
                 progress: bool = True) -> dict:
    """Run every stage (cached under ``out``) and write ``report.md`` / ``report.html``; returns the results."""
    from .report import write_report

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out, console or Console(stderr=True), progress)
    write_text(out / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    t0 = time.perf_counter()
    results: dict = {"config": asdict(cfg), "stats": stage_stats(ctx), "train": {}, "deepshape": {},
                     "compress": {}, "formats": {}}
    for base in ("he-plain", "gg-backslash"):
        results["train"][base] = stage_train(ctx, base)
        results["deepshape"][base] = stage_deepshape(ctx, base)
    for variant in VARIANTS:
        upstream = _key(results["deepshape" if "+" in variant else "train"][variant.split("+")[0]])
        results["compress"][variant] = stage_compress(ctx, variant, upstream)
        results["formats"][variant] = stage_formats(ctx, variant, upstream)
    results["seconds"] = time.perf_counter() - t0
    results["report"] = {k: str(v) for k, v in write_report(results, out).items()}
    write_text(out / "results.json", json.dumps(results, indent=1, default=float) + "\n")
    return results
