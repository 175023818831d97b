"""The pipeline's settings: :class:`PipelineConfig`, its presets per model and size, and the names it uses."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import formats
from ..codec import registry
from ..codec.quantizer import DEFAULT_REL_ERROR
from ..tasks import data

BASES = ("plain", "backslash")  # the two trainings of every seed
VARIANTS = ("plain", "backslash", "plain+deepshape", "backslash+deepshape")
CODERS = tuple(c for c in registry.CODERS if c != "ans-hist")  # the coded files the pipeline writes
FORMATS = ("fp16", "bf16", "fp8-e4m3", "fp8-e4m3-scaled", "int8", "rf8", "rf8-round")
MODELS = ("minilm", "small-bert")
SIZES = ("default", "tiny")
UPDATES = ("subgradient", "proximal")

# (model, size) -> settings that differ from the dataclass defaults (the MiniLM default run).
# MiniLM default (docs/results/pipeline/README.md has the measurements): 1024 training examples, one epoch
# (32 steps) at lr 2e-4: plain reaches ~77% validation accuracy on sentiment (lr 1e-4: 73%); 2 seeds, so that
# the whole run stays under 15 minutes on 2 CPU cores. lambda 8000 with the proximal step: lambda x steps
# = 2.6e5, about the total shrinkage of the pretrained study's best sentiment setting (412 x 793 steps; 23%
# exact zeros, -1 point); measured here: 19% exact zeros, -1.4 points on one seed (lambda 2000: 6%, -2.9).
PRESETS: dict[tuple[str, str], dict] = {
    ("minilm", "default"): {},
    ("minilm", "tiny"): {"max_len": 16, "max_examples": 64, "eval_examples": 64, "formats": ("fp16", "rf8")},
    ("small-bert", "default"): {"max_len": 64, "epochs": 3, "backslash_epochs": 2, "lr": 1e-3, "lam": 300.0,
                                "update": "subgradient", "max_examples": None, "eval_examples": None},
    ("small-bert", "tiny"): {"vocab_size": 512, "max_len": 32, "epochs": 1, "backslash_epochs": 1, "lr": 1e-3,
                             "lam": 300.0, "update": "subgradient", "max_examples": 96, "eval_examples": 48,
                             "gof_values": 1 << 12},
}


class PipelineError(ValueError):
    """Bad pipeline settings."""


@dataclass
class PipelineConfig:
    """Everything the pipeline's results depend on (``ggprior.pipeline.run`` describes the stages).

    ``model="minilm"`` fine-tunes the pretrained model named by ``pretrained`` (``"minilm"`` or a
    transformers folder); ``"small-bert"`` trains a small BERT (``arch``, ``scale``, ``vocab_size``,
    BPE tokenizer) from scratch with He init (plain) and GG init of shape ``gamma`` (BackSlash).
    ``max_examples`` / ``eval_examples`` keep a fixed random subset of the training / validation and
    test splits (None: all). ``seeds`` trainings per variant, seeds ``seed .. seed + seeds - 1``;
    the first one also goes through DeepShape, coding and the formats. ``update`` is the BackSlash
    step (``proximal``: soft threshold, exact zeros). Coded files use the per-tensor step rule
    ``rel_error`` and the paper's ``bits``-bit FL grid.
    """

    task: str = "sentiment"
    model: str = "minilm"
    pretrained: str = "minilm"
    arch: str = "bert"
    scale: int = 1
    vocab_size: int = 4096
    max_len: int = 64
    max_examples: int | None = 1024
    eval_examples: int | None = None
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-4
    gamma: float = 0.1
    lam: float = 8000.0
    update: str = "proximal"
    backslash_epochs: int = 1
    k_gamma: float = 1.1
    k_beta: float = 0.7
    finetune_epochs: int = 1
    rel_error: float = DEFAULT_REL_ERROR
    bits: int = 10
    gof_values: int = 1 << 18
    seed: int = 0
    seeds: int = 2
    device: str = "cpu"
    coders: tuple[str, ...] = CODERS
    formats: tuple[str, ...] = FORMATS

    @classmethod
    def preset(cls, size: str = "default", model: str | None = None, **overrides) -> PipelineConfig:
        """The ``model`` x ``size`` preset with ``overrides`` (None values ignored) applied. ``model=None`` is
        MiniLM at the default size and the small BERT at ``tiny`` (a minute-long smoke run: MiniLM's 22.7M
        values take minutes to code and store in every format even when trained on a few examples)."""
        if size not in SIZES:
            raise PipelineError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
        model = model or ("minilm" if size == "default" else "small-bert")
        if model not in MODELS:
            raise PipelineError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        base = replace(cls(model=model), **PRESETS[model, size])
        given = {k: v for k, v in overrides.items() if v is not None}
        if "epochs" in given and "backslash_epochs" not in given:
            given["backslash_epochs"] = min(base.backslash_epochs, given["epochs"])
        cfg = replace(base, **given)
        cfg.validate()
        return cfg

    @property
    def pretrained_model(self) -> bool:
        """True when the variants are fine-tuned from ``pretrained`` (not trained from scratch)."""
        return self.model == "minilm"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def validate(self) -> None:
        if self.task not in data.TASKS:
            raise PipelineError(f"unknown task {self.task!r}; known: {', '.join(data.TASKS)}")
        if self.model not in MODELS:
            raise PipelineError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.arch not in ("bert", "gpt2", "llama"):
            raise PipelineError(f"arch must be bert, gpt2 or llama, got {self.arch!r}")
        if self.epochs < 1 or self.finetune_epochs < 0 or not 0 <= self.backslash_epochs <= self.epochs:
            raise PipelineError(f"need epochs >= 1, finetune_epochs >= 0, 0 <= backslash_epochs <= epochs: {self}")
        if self.seeds < 1:
            raise PipelineError(f"seeds must be at least 1, got {self.seeds}")
        if not (self.gamma > 0 and self.lam >= 0 and self.k_gamma > 0 and self.k_beta > 0 and self.lr > 0):
            raise PipelineError("gamma, lr, k_gamma and k_beta must be positive and lam non-negative")
        if self.update not in UPDATES:
            raise PipelineError(f"update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if not 2 <= self.bits <= 16:
            raise PipelineError(f"bits must be in [2, 16], got {self.bits}")
        if not 0 < self.rel_error < 1:
            raise PipelineError(f"rel_error must be in (0, 1), got {self.rel_error}")
        for name in ("max_examples", "eval_examples"):
            if (n := getattr(self, name)) is not None and n < 1:
                raise PipelineError(f"{name} must be positive or None, got {n}")
        unknown = [f for f in self.formats if f not in formats.FORMATS]
        if unknown:
            raise PipelineError(f"unknown format(s) {', '.join(unknown)}")
