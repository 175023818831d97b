"""What the pipeline's stages share: settings, output folder, data, models, and the stage cache."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_model, save_model
from torch import nn

from ..io.atomic import atomic_path, write_text
from ..tasks import data, models
from ..tasks.tokenizer import TextTokenizer, get_tokenizer
from ..train import evaluate
from .config import PipelineConfig


def key_of(obj: object) -> str:
    """A short hash of ``obj`` (JSON, keys sorted): what a cached stage was computed from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def by_length(d: data.TaskData) -> data.TaskData:
    """The same examples, longest first: evaluation batches then carry little padding (the accuracy of
    a set does not depend on its order)."""
    order = torch.argsort(d.tensors["attention_mask"].sum(dim=1), descending=True, stable=True)
    return data.TaskData(d.name, d.split, d.kind, {k: v[order] for k, v in d.tensors.items()},
                         num_labels=d.num_labels, pad_id=d.pad_id, meta=d.meta)


def load_pretrained(source: str, num_labels: int) -> nn.Module:
    """``source`` (``"minilm"`` or a transformers folder) with a fresh ``num_labels`` head, in float32
    (transformers 5 may load another dtype). The head is drawn from torch's global generator.

    Attention is the eager implementation: on CPU, SDPA's flash kernel calls MKL's GEMM inside its own
    OpenMP loop; in the pipeline's process nested OpenMP was on (max-active-levels 255) and every
    evaluation of MiniLM took ~100 s instead of ~10 s per 1000 examples (the tiny run: 72 s instead of
    over 5 minutes)."""
    if source == "minilm":
        return models.load_minilm(num_labels, attn_implementation="eager").float()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                              attn_implementation="eager").float()


@dataclass
class Context:
    """Settings, output folder, console, and the data and model skeleton loaded once."""

    cfg: PipelineConfig
    out: Path
    console: Console
    progress: bool = True
    tokenizer: TextTokenizer | None = None
    splits: dict[str, data.TaskData] = field(default_factory=dict)
    _skeleton: nn.Module | None = None

    def model_path(self, variant: str, seed: int | None = None) -> Path:
        """Where a variant's fp32 weights are: ``models/<variant>.safetensors`` for the first seed."""
        suffix = "" if seed is None or seed == self.cfg.seed else f".seed{seed}"
        return self.out / "models" / f"{variant}{suffix}.safetensors"

    def load_data(self) -> None:
        if self.splits:
            return
        c = self.cfg
        self.tokenizer = (get_tokenizer("minilm") if c.pretrained_model
                          else get_tokenizer("bpe", c.task, c.vocab_size))
        for split in data.SPLITS:
            limit = c.max_examples if split == "train" else c.eval_examples
            d = data.load_task(c.task, split, self.tokenizer, c.max_len, max_examples=limit)
            self.splits[split] = d if split == "train" else by_length(d)

    def fresh_model(self, seed: int) -> nn.Module:
        """The model a training starts from: MiniLM (pretrained, new head drawn from ``seed``) or a
        small BERT built from ``seed`` (initialised by the caller)."""
        self.load_data()
        c = self.cfg
        torch.manual_seed(seed)
        labels = self.splits["train"].num_labels
        if c.pretrained_model:
            return load_pretrained(c.pretrained, labels)
        return models.build_model(c.arch, "classification", vocab_size=self.tokenizer.vocab_size,
                                  num_labels=labels, pad_id=self.tokenizer.pad_id,
                                  max_positions=max(64, c.max_len), scale=c.scale)

    def new_model(self) -> nn.Module:
        """A model of the pipeline's architecture to load weights into (a copy of one kept skeleton)."""
        if self._skeleton is None:
            self._skeleton = self.fresh_model(self.cfg.seed)
        return copy.deepcopy(self._skeleton)

    def load_variant(self, variant: str, seed: int | None = None) -> nn.Module:
        model = self.new_model()
        load_model(model, str(self.model_path(variant, seed)), strict=True, device=self.cfg.device)
        return model.to(self.cfg.device)

    def accuracy(self, model: nn.Module) -> float:
        self.load_data()
        return evaluate(model.to(self.cfg.device), self.splits["test"])["accuracy"]

    def save(self, model: nn.Module, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_model(model, str(tmp))

    def cached(self, name: str, key_obj: object, fn: Callable[[], dict]) -> dict:
        """Run ``fn`` unless ``out/stages/<name>.json`` holds a result for the same inputs; a computed
        result records its wall and CPU seconds (``seconds``, ``cpu_seconds``) and the load average."""
        path = self.out / "stages" / f"{name}.json"
        key = key_of(key_obj)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("key") == key:
                self.console.print(f"· {name}: cached", style="dim", markup=False)
                return saved["result"]
        self.console.print(f"▶ {name}", style="bold", markup=False)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                      load_average=os.getloadavg()[0], threads=torch.get_num_threads())
        write_text(path, json.dumps({"key": key, "result": result}, indent=1, default=float) + "\n")
        self.console.print(f"  {name} done in {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s CPU)",
                           markup=False)
        return result
