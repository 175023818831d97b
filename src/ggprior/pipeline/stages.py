"""The pipeline's stages; each returns a JSON-able dict and is cached by :meth:`Context.cached`."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from torch import nn

from .. import formats, stats
from ..codec import container, lengths
from ..deepshape import BIN_WIDTH, reshape_model_
from ..io.tensors import floating_values
from ..tasks import data, models
from ..train import TrainConfig, make_rate_callback, rate_parameters, train
from .config import PipelineConfig, PipelineError
from .context import Context, key_of

FIXED_STEP = 2.0**-8  # the studies' fixed grid (docs/results): code lengths reported beside the per-tensor ones
ZSTD_LEVEL = 9  # the general-purpose baseline; level 19 costs ~45 CPU s per MiniLM file for ~1% smaller output


def rules(c: PipelineConfig) -> dict[str, dict]:
    """The step rules of the coded files: the library's default (per-tensor relative RMS error) and the
    paper's per-tensor FL grid. Name -> ``save_compressed`` / ``measure`` keyword."""
    return {f"rel {c.rel_error:g}": {"rel_error": c.rel_error}, f"{c.bits}-bit": {"bits": c.bits}}


def exact_zeros(model: nn.Module) -> float:
    """Fraction of exact zeros in the matrices (the values BackSlash penalises)."""
    params = [p for _, p in rate_parameters(model)]
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


def stage_stats(ctx: Context) -> dict:
    """GG fit of the pretrained model: the pooled and group rows, plus a plot of the linear weights."""
    c = ctx.cfg

    def run() -> dict:
        from ..gg import GGFit
        from ..io.tables import write_table
        from ..report.plots import plot_fit

        samples: dict[str, torch.Tensor] = {}
        rows = stats.fit_model(c.pretrained, max_gof_values=c.gof_values, seed=c.seed, progress=ctx.progress,
                               pool_samples=samples)
        write_table(rows, ctx.out / "stats", "fit", title=f"GG fit of {c.pretrained}")
        pooled = [r for r in rows if r["name"].startswith(("__", "group:"))]
        lin = next((r for r in pooled if r["name"] == stats.LINEAR_ROW and "gamma" in r), None)
        if lin is not None and stats.LINEAR_ROW in samples:
            fit = GGFit(mu=lin["mu"], beta=lin["beta"], gamma=lin["gamma"], n=lin["numel"], std=lin["std"],
                        ratio=float("nan"), at_bound=lin["gamma_at_bound"], method=lin["fit_method"])
            plot_fit(samples[stats.LINEAR_ROW], fit, ctx.out / "plots" / "pretrained_fit.png",
                     title=f"{c.pretrained}: linear weights pooled")
        return {"source": c.pretrained, "pooled": pooled}

    return ctx.cached("stats", {"pretrained": c.pretrained, "gof": c.gof_values, "seed": c.seed}, run)


def _documents(d: data.TaskData) -> tuple[list[str], list[int]]:
    """The examples of a split as space-separated token ids (padding dropped), and their labels."""
    ids, mask = d.tensors["input_ids"], d.tensors["attention_mask"].bool()
    return [" ".join(map(str, row[m].tolist())) for row, m in zip(ids, mask, strict=True)], d.tensors["labels"].tolist()


def stage_reference(ctx: Context) -> dict:
    """TF-IDF (token 1-2 grams of the same tokenizer) + logistic regression on the same examples, C chosen on
    validation: what a bag of words reaches. Empty where scikit-learn (the ``studies`` extra) is missing."""
    c = ctx.cfg

    def run() -> dict:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            return {}
        ctx.load_data()
        docs = {s: _documents(d) for s, d in ctx.splits.items()}
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"\S+")
        xtr = vec.fit_transform(docs["train"][0])
        cs = (1.0, 10.0, 100.0)
        fits = [LogisticRegression(C=C, max_iter=3000).fit(xtr, docs["train"][1]) for C in cs]
        score = {s: [float(f.score(vec.transform(docs[s][0]), docs[s][1])) for f in fits] for s in ("validation", "test")}
        best = int(np.argmax(score["validation"]))
        return {"accuracy": score["test"][best], "C": cs[best]}

    return ctx.cached("reference", {k: getattr(c, k) for k in ("task", "model", "vocab_size", "max_len",
                                                                 "max_examples", "eval_examples")}, run)


def train_key(c: PipelineConfig, base: str, seed: int) -> dict:
    """The settings a trained variant depends on (the BackSlash ones only for ``backslash``)."""
    names = ["task", "model", "max_len", "epochs", "batch_size", "lr", "max_examples", "eval_examples"]
    names += ["pretrained"] if c.pretrained_model else ["arch", "scale", "vocab_size"]
    key = {k: getattr(c, k) for k in names} | {"base": base, "seed": seed}
    if base == "backslash":
        key.update(lam=c.lam, bs=c.backslash_epochs, update=c.update)
        if not c.pretrained_model:
            key.update(gamma=c.gamma)
    return key


def stage_train(ctx: Context, base: str, seed: int) -> dict:
    """Train ``plain`` or ``backslash`` from ``seed``: fine-tune the pretrained model (plain, or BackSlash
    towards the GG prior), or train the small BERT from He init (plain) / GG init (BackSlash)."""
    c = ctx.cfg
    key = train_key(c, base, seed)

    def run() -> dict:
        model = ctx.fresh_model(seed)
        if not c.pretrained_model:
            models.initialize_(model, "gg" if base == "backslash" else "he", c.gamma,
                               generator=torch.Generator().manual_seed(seed))
        cb = make_rate_callback("backslash", c.lam, epochs=c.backslash_epochs, update=c.update) \
            if base == "backslash" else None
        cfg = TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=seed, device=c.device,
                          progress=ctx.progress)
        folder = ctx.out / "train" / f"{base}.seed{seed}"
        stamp = folder / "inputs.key"
        if folder.exists() and (not stamp.is_file() or stamp.read_text() != key_of(key)):
            shutil.rmtree(folder)  # a checkpoint of other settings: never resume it
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key_of(key))
        metrics = train(model, ctx.splits["train"], ctx.splits["validation"], cfg, [cb] if cb else [],
                        out_dir=folder, resume=True, test_data=ctx.splits["test"])
        ctx.save(model, ctx.model_path(base, seed))
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # only needed to resume an interrupted run
        return {"variant": base, "seed": seed, "accuracy": metrics["test"]["accuracy"],
                "train_seconds": metrics["seconds"], "history": metrics["history"],
                "parameters": models.count_parameters(model), "exact_zeros": exact_zeros(model)}

    return ctx.cached(f"train-{base}-s{seed}", key, run)


def stage_deepshape(ctx: Context, base: str) -> dict:
    """DeepShape (K_gamma, K_beta) on the first seed's ``base``, then ``finetune_epochs`` of plain training."""
    c = ctx.cfg
    key = {**train_key(c, base, c.seed), "k_gamma": c.k_gamma, "k_beta": c.k_beta, "ft": c.finetune_epochs}

    def run() -> dict:
        model = ctx.load_variant(base)
        # per tensor on the paper's grid (2^-13), else on one 16x finer; a tensor neither grid can reshape is
        # left as it is, with the reason (BackSlash leaves cores narrower than the paper's bins)
        shaped = reshape_model_(model, c.k_gamma, c.k_beta, select="matrices", fallback_widths=(BIN_WIDTH / 16,),
                                skip_unshapeable=True)
        acc_reshaped = ctx.accuracy(model)
        history = []
        if c.finetune_epochs:
            cfg = TrainConfig(epochs=c.finetune_epochs, batch_size=c.batch_size, lr=c.lr / 10, seed=c.seed + 1,
                              device=c.device, progress=ctx.progress)
            history = train(model, ctx.splits["train"], ctx.splits["validation"], cfg)["history"]
        ctx.save(model, ctx.model_path(f"{base}+deepshape"))
        return {"variant": f"{base}+deepshape", "accuracy_reshaped": acc_reshaped, "accuracy": ctx.accuracy(model),
                "history": history, "tensors": [{**r.to_row(), "bin_width": r.bin_width} for r in shaped.reports],
                "skipped": shaped.skipped, "exact_zeros": exact_zeros(model)}

    return ctx.cached(f"deepshape-{base}", key, run)


def _coded(ctx: Context, model: nn.Module, stem: str, rule: dict, coders: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Write ``model`` as ``files/<stem>.<coder>.ggz`` with each coder under ``rule``; check that every
    file decodes to the same weights. Returns the rows (format, file, bytes) and the decoded state dict."""
    folder = ctx.out / "files"
    folder.mkdir(parents=True, exist_ok=True)
    rows, decoded = [], None
    for coder in coders:
        path = folder / f"{stem}.{coder}.ggz"
        container.save_compressed(model, path, coder=coder, files={}, **rule)  # weights only, like the formats
        sd = container.load_compressed(path)
        if decoded is None:
            decoded = sd
        elif any(not torch.equal(decoded[k], sd[k]) for k in decoded):
            raise PipelineError(f"{path}: decodes to different weights than the {coders[0]} file")
        rows.append({"format": f"ggz-{coder}", "file": path.name, "bytes": path.stat().st_size})
    return rows, decoded


def _zstd_row(path, decoded: dict) -> dict:
    """zstd of the same integers as a ``.ggz`` file (int16), plus the exact tensors and 4 bytes of step each."""
    import zstandard

    ints = container.load_integers(path)
    raw = np.concatenate([q.numpy().astype(np.int16).ravel() for q, _ in ints.values()])
    exact = sum(t.nbytes for k, t in decoded.items() if k not in ints)
    size = len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw.tobytes())) + exact + 4 * len(ints)
    return {"format": f"zstd-{ZSTD_LEVEL}", "file": None, "bytes": size}


def stage_compress(ctx: Context, variant: str, upstream: str) -> dict:
    """Per step rule: ``.ggz`` files with every coder, zstd of the same integers, CR(EG)/CR(HM), accuracy."""
    c = ctx.cfg
    key = {"upstream": upstream, "rules": rules(c), "coders": list(c.coders), "fixed_step": FIXED_STEP,
           "zstd": ZSTD_LEVEL}

    def run() -> dict:
        model = ctx.load_variant(variant)
        n = floating_values(model.state_dict())
        out = {"variant": variant, "weights": n, "rules": {}}
        for name, rule in rules(c).items():
            stem = f"{variant}.{name.replace(' ', '')}"
            rows, decoded = _coded(ctx, model, stem, rule, c.coders)
            rows.append(_zstd_row(ctx.out / "files" / rows[0]["file"], decoded))
            quantized = ctx.new_model()
            quantized.load_state_dict(decoded, strict=True)
            acc = ctx.accuracy(quantized)
            _, summary = lengths.measure(model, coders=("fl", "eg", "huffman"), **rule)
            for r in rows:
                r.update(accuracy=acc, bits_per_weight=8 * r["bytes"] / n)
            out["rules"][name] = {"accuracy": acc, "rows": rows, "cr_eg": summary["cr_eg"],
                                  "cr_huffman": summary["cr_huffman"]}
        _, fixed = lengths.measure(model, step=FIXED_STEP, include="matrices", coders=("fl", "eg", "huffman"))
        out["fixed_step"] = {"step": FIXED_STEP, **{k: fixed[k] for k in ("cr_eg", "cr_huffman", "bpw_eg",
                                                                        "bpw_huffman")}}
        return out

    return ctx.cached(f"compress-{variant}", key, run)


def stage_code(ctx: Context, base: str, seed: int, upstream: str) -> dict:
    """A later seed's trained ``base`` as an ANS ``.ggz`` file under the default rule: size and accuracy
    (the seed comparison; the first seed's come from :func:`stage_compress`)."""
    c = ctx.cfg
    name, rule = next(iter(rules(c).items()))

    def run() -> dict:
        model = ctx.load_variant(base, seed)
        n = floating_values(model.state_dict())
        rows, decoded = _coded(ctx, model, f"{base}.seed{seed}.{name.replace(' ', '')}", rule, ("ans",))
        quantized = ctx.new_model()
        quantized.load_state_dict(decoded, strict=True)
        return {"variant": base, "seed": seed, "rule": name, "accuracy": ctx.accuracy(quantized),
                "bits_per_weight": 8 * rows[0]["bytes"] / n}

    return ctx.cached(f"code-{base}-s{seed}", {"upstream": upstream, "rule": rule}, run)


def stage_formats(ctx: Context, variant: str, upstream: str, fp32_accuracy: float) -> dict:
    """The variant stored in fp32 (accuracy measured upstream) and in every 8/16-bit format: size, accuracy."""
    c = ctx.cfg
    key = {"upstream": upstream, "formats": list(c.formats)}

    def run() -> dict:
        model = ctx.load_variant(variant)
        n = floating_values(model.state_dict())
        folder = ctx.out / "files"
        path = ctx.model_path(variant)
        rows = [{"format": "fp32", "file": path.name, "bytes": path.stat().st_size, "accuracy": fp32_accuracy}]
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

    return ctx.cached(f"formats-{variant}", key, run)
