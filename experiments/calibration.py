"""Which sensitivity weights ``ggprior compress --target-bits`` should use: none (every tensor alike), the Fisher
information of the model's own outputs on calibration text (``codec.sensitivity.calibration_weights``, the CLI's
``--calibration``) at 1024 / 4096 / 16384 tokens of bbc-lm train text, and each model's own task loss (the rule of
the rate-distortion experiments before it), on three models of different kinds.

    python experiments/calibration.py [--models-dir WORK/models] [--work WORK] [--out docs/results/calibration]
                                      [--report-only]

Every point goes the way a user's does: the weights of the Hugging Face folder, then
``save_compressed(folder, target_bits=B, weights=w)`` (every floating tensor quantized, as the CLI's default) and
the decoded file loaded back into the model. Models and quality:

* all-MiniLM-L6-v2 (the built-in folder; a ``BertModel``, so the Fisher probes its hidden states): cosine of the
  mean-pooled sentence embedding to the original's over 96 test sentences (``rate_distortion.minilm``); its task
  loss: the pooled embedding's Gaussian probe on 64 train sentences.
* SmolLM2-135M (its GGUF dequantized to float32, saved once as a folder under WORK): perplexity and KL divergence from
  the original over 8192 bbc-lm test tokens (``rate_distortion.smollm2``); task loss: the next-token loss on 16
  train blocks of 256.
* the sentiment classifier of ``pretrained_study.py`` (seed 0, saved once as a folder under WORK with MiniLM's
  tokenizer): accuracy on the full test split; task loss: cross-entropy on 4 shuffled train batches of 32.

The Fisher's draws use seed 0. Writes results.json, README.md and calibration.png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import rate_distortion as RD  # noqa: E402
import rd_tasks as RT  # noqa: E402
from ggprior.codec import load_compressed, read_header, save_compressed, stored_bytes  # noqa: E402
from ggprior.codec.sensitivity import calibration_weights, sensitivity_weights  # noqa: E402
from ggprior.io.sources import builtin_model_dir  # noqa: E402
from ggprior.tasks.data import batches, corpus_split  # noqa: E402

TOKENS = (1024, 4096, 16384)
TARGETS = {"minilm": (3.0, 4.0), "smollm2": (3.5, 4.5), "sentiment": (2.5, 3.0)}


def _folder_minilm(work: Path):
    model, quality, calib, loss_fn = RD.minilm(dict(RD.FULL))
    return builtin_model_dir("minilm"), model, quality, (calib, loss_fn)


def _folder_smollm2(work: Path):
    from formats_study import load_smollm2

    folder = work / "smollm2-hf"
    p = dict(RD.FULL, lm_tokens=8192, lm_calib=16)
    model, quality, calib, _ = RD.smollm2(p)
    if not (folder / "config.json").is_file():
        _, tok = load_smollm2()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder, model, quality, (calib, lambda m, b: m(**b, labels=b["input_ids"]).loss)


def _folder_sentiment(work: Path, models_dir: Path):
    from transformers import AutoTokenizer

    folder = work / "sentiment-s0-hf"
    model, _ = RT.load_classifier("sentiment", 0, models_dir, False)
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(builtin_model_dir("minilm"))).save_pretrained(folder)
    data = RT.task_data("sentiment", False)
    test = RT.by_length(data["test"])

    @torch.no_grad()
    def quality(m) -> float:
        m.eval()
        pred = torch.cat([m(**b).logits.argmax(-1) for b in batches(test, 128)])
        return float((pred == test.tensors["labels"]).double().mean())

    gen = torch.Generator().manual_seed(1000)
    calib = list(itertools.islice(batches(data["train"], 32, shuffle=True, generator=gen), 4))
    return folder, model, quality, (calib, None)


def coded(folder: Path, model: torch.nn.Module, B: float, w: dict | None) -> tuple[torch.nn.Module, float, int]:
    """The model with the folder's tensors written at ``B`` bits/weight and read back; bits/weight, file bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        h = save_compressed(folder, f"{tmp}/m.ggz", target_bits=B, weights=w)
        back = load_compressed(f"{tmp}/m.ggz")
        q = [e for e in read_header(f"{tmp}/m.ggz")["tensors"] if e["encoding"] == "quantized"]
    sd = model.state_dict()
    unknown = sorted(k for k in set(back) - set(sd) if back[k].is_floating_point())  # not buffers (position_ids)
    if unknown:
        raise SystemExit(f"{folder}: tensors the model does not hold: {unknown[:3]}")
    m2 = copy.deepcopy(model)
    m2.load_state_dict({k: v.to(sd[k].dtype) for k, v in back.items() if k in sd}, strict=False)
    n = sum(math.prod(e["shape"]) for e in q)
    return m2, 8 * sum(stored_bytes(e) for e in q) / n, h["file_bytes"]


def run(name: str, folder: Path, model, quality, task, texts: list[str]) -> list[dict]:
    ref = RD._measured(quality(model))
    settings: list[tuple[str, object]] = [("none", None)] + [(f"fisher-{t}", t) for t in TOKENS] + [("task-loss", task)]
    rows = []
    for tag, arg in settings:
        t0 = time.time()
        if arg is None:
            w = None
        elif isinstance(arg, int):
            w = calibration_weights(folder, texts, tokens=arg)
        else:
            calib, loss_fn = arg
            named = sensitivity_weights(model, calib, loss_fn=loss_fn)
            fill = float(np.median([v for v in named.values() if v > 0]))  # as calibration_weights: no gradient
            w = {k: v if v > 0 else fill for k, v in named.items() if k in model.state_dict()}
        secs = time.time() - t0
        for B in TARGETS[name]:
            m2, bits, size = coded(folder, model, B, w)
            q = RD._measured(quality(m2))
            rows.append({"model": name, "setting": tag, "target": B, "bits": bits, "file_bytes": size,
                         "calib_seconds": secs, **{f"ref_{k}": v for k, v in ref.items()}, **q})
            print(json.dumps(rows[-1]), flush=True)
    return rows


QUALITY = {"minilm": ("quality", "1 - cosine", lambda v: 1 - v), "smollm2": ("kl", "KL from the original (nats/token)",
           lambda v: v), "sentiment": ("quality", "accuracy drop (points)", None)}


def plot(rows: list[dict], path: Path) -> Path:
    from ggprior.report.plots import plt, save_figure

    names = [n for n in TARGETS if any(r["model"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.7 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        key, label, f = QUALITY[name]
        for B, c in zip(TARGETS[name], ("C0", "C1", "C2", "C3"), strict=False):
            pts = [r for r in rows if r["model"] == name and r["target"] == B]
            val = [(100 * (r["ref_quality"] - r["quality"]) if f is None else f(r[key])) for r in pts]
            ax.plot(range(len(pts)), val, marker="o", color=c, label=f"{B} bits/weight")
            ax.set_xticks(range(len(pts)), [r["setting"] for r in pts], rotation=30, fontsize=8)
        if name != "sentiment":
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Sensitivity weights for --target-bits: none, output Fisher on bbc-lm text, the task's own loss")
    return save_figure(fig, path)


def report(d: dict) -> str:
    rows = d["rows"]
    L = ["# Calibration: which sensitivity weights `ggprior compress --target-bits` uses", "",
         f"Command: `{d['command']}` ({d['seconds']:.0f} s on 2 CPU cores, nothing else running). Seeds: Fisher draws 0, "
         "classifier seed 0, train batches 1000.", "",
         "Settings: `none` (every tensor alike, what `--target-bits` did before `--calibration`), `fisher-N` (the "
         "Fisher information of the model's own outputs on N tokens of bbc-lm train text: `calibration_weights`, the "
         "CLI's default), `task-loss` (the squared gradient of the model's own task loss on its own data: MiniLM the "
         "pooled embedding's Gaussian probe, SmolLM2 the next-token loss, the classifier its labels). Every tensor "
         "quantized (the CLI's `--select all`); bits/weight over them, side information included.", "",
         "![calibration](calibration.png)", ""]
    for name in TARGETS:
        pts = [r for r in rows if r["model"] == name]
        if not pts:
            continue
        kl = "kl" in pts[0]
        qlab = {"minilm": "cosine", "smollm2": "perplexity", "sentiment": "accuracy"}[name]
        L += [f"## {name}", "", f"Reference {qlab}: {pts[0]['ref_quality']:.5f}.", "",
              f"| setting | calibration s | target | bits/weight | {qlab} |" + (" KL (nats/token) |" if kl else ""),
              "|---|---|---|---|---|" + ("---|" if kl else "")]
        for r in pts:
            L.append(f"| {r['setting']} | {r['calib_seconds']:.1f} | {r['target']} | {r['bits']:.3f} | "
                     f"{r['quality']:.5f} |" + (f" {r['kl']:.5f} |" if kl else ""))
        L += [""]
    L += ["## Best setting per model and rate", ""] + findings(rows) + [""]
    return "\n".join(L) + "\n"


def findings(rows: list[dict]) -> list[str]:
    """Per model and rate: each setting's loss in the model's own unit, and the default's against none's."""
    unit = {"minilm": ("1 - cosine", "{:.4f}"), "smollm2": ("KL", "{:.3f}"), "sentiment": ("accuracy drop", "{:+.2f} pt")}
    out = []
    for name in TARGETS:
        key, _, f = QUALITY[name]
        for B in TARGETS[name]:
            pts = [r for r in rows if r["model"] == name and r["target"] == B]
            if not pts:
                continue
            loss = {r["setting"]: 100 * (r["ref_quality"] - r["quality"]) if f is None else f(r[key]) for r in pts}
            lab, form = unit[name]
            ratio = (f"; the default `fisher-4096` has {loss['fisher-4096'] / loss['none']:.2f}x none's loss"
                     if f is not None and "fisher-4096" in loss else "")
            out.append(f"* {name} at {B} bits/weight, {lab}: " + ", ".join(
                f"`{k}` {form.format(v)}" for k, v in loss.items()) + ratio + ".")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("runs/pretrained_cpu/models"))
    ap.add_argument("--work", type=Path, default=Path("runs/calibration"))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "calibration")
    ap.add_argument("--models", default=",".join(TARGETS))
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        d = json.loads((a.out / "results.json").read_text())
    else:
        torch.manual_seed(0)
        t0 = time.time()
        texts = corpus_split("bbc-lm", "train")
        rows = []
        for name in a.models.split(","):
            if name == "minilm":
                folder, model, quality, task = _folder_minilm(a.work)
            elif name == "smollm2":
                folder, model, quality, task = _folder_smollm2(a.work)
            else:
                folder, model, quality, task = _folder_sentiment(a.work, a.models_dir)
            rows += run(name, folder, model, quality, task, texts)
            del model
        d = {"command": RD.command_line("experiments/calibration.py"), "seconds": time.time() - t0, "rows": rows}
        (a.out / "results.json").write_text(json.dumps(d, indent=1))
    plot(d["rows"], a.out / "calibration.png")
    (a.out / "README.md").write_text(report(d))


if __name__ == "__main__":
    main()
