"""The report's tables and findings, computed from the stages' results (no files read)."""

from __future__ import annotations

import statistics

COLUMNS = ["variant", "format", "accuracy", "bits/weight", "file size (MiB)", "CR(EG)", "CR(HM)"]
GRID_COLUMNS = ["variant", "accuracy", "FL", "EG", "Huffman", "ANS", "zstd", "CR(EG)", "CR(HM)"]
SEED_COLUMNS = ["seed", "plain: accuracy", "BackSlash: accuracy", "difference (points)", "plain: ANS bits/weight",
                "BackSlash: ANS bits/weight", "size ratio", "BackSlash: exact zeros"]
STAGE_COLUMNS = ["stage", "wall (s)", "CPU (s)", "load average", "threads"]
LABELS = {
    "minilm": {"plain": "MiniLM + plain fine-tune", "backslash": "MiniLM + BackSlash (GG prior) fine-tune"},
    "small-bert": {"plain": "He init + plain", "backslash": "GG init + BackSlash"},
}


def label(results: dict, variant: str) -> str:
    """A variant's name in words, e.g. ``MiniLM + plain fine-tune + DeepShape``."""
    base, *rest = variant.split("+")
    return " + ".join([LABELS[results["config"]["model"]][base], *(r.replace("deepshape", "DeepShape") for r in rest)])


def default_rule(results: dict) -> str:
    """The name of the first step rule (the library's default, relative RMS error)."""
    return next(iter(next(iter(results["compress"].values()))["rules"]))


def summary_rows(results: dict) -> list[dict]:
    """One row per (variant, storage format) in pipeline order; coded files under the default rule."""
    rule = default_rule(results)
    rows = []
    for variant, comp in results["compress"].items():
        coded = comp["rules"][rule]
        for r in results["formats"][variant]["rows"] + coded["rows"]:
            ggz = r["format"].startswith("ggz-")
            rows.append({
                "variant": variant, "format": r["format"], "accuracy": r["accuracy"],
                "bits/weight": r["bits_per_weight"], "file size (MiB)": r["bytes"] / 2**20,
                "CR(EG)": coded["cr_eg"] if ggz else None, "CR(HM)": coded["cr_huffman"] if ggz else None,
            })
    return rows


def grid_rows(results: dict, rule: str) -> list[dict]:
    """Per variant, the coded files under ``rule``: accuracy and bits/weight of each coder written and of zstd."""
    out = []
    for variant, comp in results["compress"].items():
        r = comp["rules"][rule]
        bpw = {x["format"].removeprefix("ggz-").split("-")[0]: x["bits_per_weight"] for x in r["rows"]}
        out.append({"variant": variant, "accuracy": r["accuracy"], "FL": bpw.get("fl"), "EG": bpw.get("eg"),
                    "Huffman": bpw.get("huffman"), "ANS": bpw.get("ans"), "zstd": bpw["zstd"], "CR(EG)": r["cr_eg"],
                    "CR(HM)": r["cr_huffman"]})
    return out


def seed_pairs(results: dict) -> list[dict]:
    """Per seed, plain against BackSlash: fp32 test accuracy, the ANS file (default rule), exact zeros."""
    rule = default_rule(results)
    first = str(results["config"]["seed"])
    out = []
    for seed, pair in results["seeds"].items():
        row = {"seed": int(seed)}
        for base in ("plain", "backslash"):
            if seed == first:
                ans = next(r for r in results["compress"][base]["rules"][rule]["rows"] if r["format"] == "ggz-ans")
                bpw = ans["bits_per_weight"]
            else:
                bpw = pair[base]["code"]["bits_per_weight"]
            row.update({f"{base}_accuracy": pair[base]["train"]["accuracy"], f"{base}_bpw": bpw,
                        f"{base}_zeros": pair[base]["train"]["exact_zeros"]})
        row["difference"] = 100 * (row["backslash_accuracy"] - row["plain_accuracy"])
        row["ratio"] = row["plain_bpw"] / row["backslash_bpw"]
        out.append(row)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], fmt: str) -> str:
    m, s = mean_sd(values)
    return f"{m:{fmt}} ± {s:{fmt.lstrip('+')}}"


def seed_rows(results: dict) -> list[dict]:
    """The seed table: one row per seed, then ``mean ± sd`` over the seeds."""
    pairs = seed_pairs(results)
    keys = ["plain_accuracy", "backslash_accuracy", "difference", "plain_bpw", "backslash_bpw", "ratio",
            "backslash_zeros"]
    fmts = [".4f", ".4f", "+.2f", ".3f", ".3f", ".2f", ".3f"]
    rows = [dict(zip(SEED_COLUMNS, [str(p["seed"]), *(f"{p[k]:{f}}" for k, f in zip(keys, fmts, strict=True))],
                     strict=True)) for p in pairs]
    rows.append(dict(zip(SEED_COLUMNS, [f"mean ± sd ({len(pairs)} seeds)",
                                        *(_pm([p[k] for p in pairs], f) for k, f in zip(keys, fmts, strict=True))],
                         strict=True)))
    return rows


def stage_rows(results: dict) -> list[dict]:
    """Wall and CPU seconds of every stage when it was computed (a cached stage keeps its original times)."""
    rows = []
    for name, r in stage_results(results):
        rows.append({"stage": name, "wall (s)": r.get("seconds"), "CPU (s)": r.get("cpu_seconds"),
                     "load average": r.get("load_average"), "threads": r.get("threads")})
    rows.append({"stage": "total", "wall (s)": sum(r["wall (s)"] or 0.0 for r in rows),
                 "CPU (s)": sum(r["CPU (s)"] or 0.0 for r in rows), "load average": None, "threads": None})
    return rows


def stage_results(results: dict) -> list[tuple[str, dict]]:
    """(name, result) of every stage, in the order they run."""
    out = [("stats", results["stats"]), ("reference", results["reference"])]
    for seed, pair in results["seeds"].items():
        for base, r in pair.items():
            out += [(f"train {base} seed {seed}", r["train"])]
            out += [(f"code {base} seed {seed}", r["code"])] if "code" in r else []
    out += [(f"deepshape {b}", r) for b, r in results["deepshape"].items()]
    for k in ("compress", "formats"):
        out += [(f"{k} {v}", r) for v, r in results[k].items()]
    return out


def compute_seconds(results: dict) -> tuple[float, float]:
    """Wall and CPU seconds the stages took when they were computed (cached stages keep their times)."""
    stages = [r for _, r in stage_results(results)]
    return sum(float(r.get("seconds", 0.0)) for r in stages), sum(float(r.get("cpu_seconds", 0.0)) for r in stages)


def _row(rows: list[dict], variant: str, fmt: str) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["format"] == fmt), None)


def findings(results: dict, rows: list[dict]) -> list[str]:
    """Plain sentences comparing the variants, computed from the measured rows."""
    cfg, out = results["config"], []
    pairs = seed_pairs(results)
    n = len(pairs)
    diff, ratio = mean_sd([p["difference"] for p in pairs]), mean_sd([p["ratio"] for p in pairs])
    out.append(f"Over {n} seed(s) ({', '.join(str(p['seed']) for p in pairs)}), BackSlash against plain: test accuracy "
               f"{diff[0]:+.2f} ± {diff[1]:.2f} points (per seed: "
               f"{', '.join(format(p['difference'], '+.2f') for p in pairs)}); ANS file at {default_rule(results)} "
               f"{ratio[0]:.2f} ± {ratio[1]:.2f}x smaller (plain {_pm([p['plain_bpw'] for p in pairs], '.3f')}, "
               f"BackSlash {_pm([p['backslash_bpw'] for p in pairs], '.3f')} bits/weight). ± is the sample standard "
               f"deviation over seeds" + ("; a difference within about two of them is not a finding." if n > 1 else
                                          "; one seed gives no spread: run --seeds 2 or more."))
    if results["reference"]:
        out.append(f"Reference: TF-IDF (token 1-2 grams) + logistic regression on the same examples reaches "
                   f"{results['reference']['accuracy']:.4f} test accuracy; plain reaches "
                   f"{_pm([p['plain_accuracy'] for p in pairs], '.4f')}.")
    c = results["compress"]
    for base in ("plain", "backslash"):
        ds, shaped = f"{base}+deepshape", results["deepshape"].get(base, {})
        if shaped.get("skipped"):
            n_done, n_skip = len(shaped["tensors"]), len(shaped["skipped"])
            out.append(f"DeepShape left {n_skip} of {n_done + n_skip} matrices of {label(results, base)} as they "
                       f"were: their target is narrower than even a 2^-17 grid.")
        if base in c and ds in c:
            fb, fd = c[base]["fixed_step"], c[ds]["fixed_step"]
            rb, rd = (c[v]["rules"][default_rule(results)] for v in (base, ds))
            out.append(f"DeepShape on {label(results, base)}: accuracy {results['train'][base]['accuracy']:.4f} -> "
                       f"{shaped['accuracy_reshaped']:.4f} right after the reshape -> {shaped['accuracy']:.4f} after "
                       f"{cfg['finetune_epochs']} fine-tune epoch(s); CR(EG) at {default_rule(results)} "
                       f"{rb['cr_eg']:.3f} -> {rd['cr_eg']:.3f}; on the fixed step 2^-8 (matrices) EG "
                       f"{fb['bpw_eg']:.3f} -> {fd['bpw_eg']:.3f} bits/weight, HM {fb['bpw_huffman']:.3f} -> "
                       f"{fd['bpw_huffman']:.3f}.")
    for variant in results["formats"]:
        base, rf8 = _row(rows, variant, "fp32"), _row(rows, variant, "rf8")
        eight = [r for r in rows if r["variant"] == variant and not r["format"].startswith(("ggz", "zstd", "fp32"))]
        if base and rf8 and eight:
            worst = min(eight, key=lambda r: r["accuracy"])
            out.append(f"{label(results, variant)}: RF8 accuracy {rf8['accuracy']:.4f} vs fp32 {base['accuracy']:.4f}; "
                       f"lowest of the 8/16-bit formats: {worst['format']} {worst['accuracy']:.4f}.")
    return out
