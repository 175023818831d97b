"""Pretrained fine-tuning study: plain vs L1 vs BackSlash (subgradient / proximal) on MiniLM.

Fine-tunes the pretrained all-MiniLM-L6-v2 (``ggprior.tasks.load_minilm``, fresh head) on the
three tasks, then measures the rate-accuracy curve of every fine-tuned model and writes real
``.ggz`` files with every coder (FL, EG, Huffman, ANS) at the chosen operating points.

Per task and seed: a plain fine-tune; L1 (nu = 1), BackSlash with the subgradient step and
BackSlash with the proximal (soft-threshold) step at the same lambdas: the size-matched
reference (2e3 x N / 110M, the per-value step the reference took on BERT-base), then 0.5x,
1x (= 2e3, the reference value as is, step lambda nu / N on this model), 2x, 4x and 8x it;
DeepShape (K_gamma 1.1, K_beta 0.7, per matrix, 2^-13 grid with a 2^-17 fallback) then one
fine-tune epoch (lr / 10; BackSlash models keep their rate at lambda / 10) on the plain and
the proximal models.

Quantization (the same faithful rule for every model): per tensor, every floating tensor, the
largest uniform step whose relative RMS error ||w - w_hat|| / ||w|| is <= rel
(``ggprior.codec.quantizer.step_for_rel_error``). rel = 1% is the "faithful" point; the rate-accuracy
curve sweeps rel over ``RELS``. Every accuracy on the curve is that of the quantized-
dequantized (i.e. decoded) model; the operating points are written as ``.ggz`` files, read
back, and the decoded model is evaluated again.

Operating point of a task: the lowest mean ANS rate over (variant, rel) whose mean VALIDATION
accuracy (decoded, over seeds) is within 1 point of the plain fine-tune's mean validation
accuracy (fp32); its TEST accuracy is then reported (selection never sees the test split).

Phases: ``train`` (GPU; parallel worker processes over (task, seed, method, lambda) jobs),
``code`` (the .ggz files, decoded accuracy, TF-IDF reference; writes ``results.json``) and
``report`` (Markdown + PNG from ``results.json``; CPU). ``--phase all`` runs the three.

    python experiments/pretrained_study.py --device cuda --workers 14 --out OUT     # the study
    python experiments/pretrained_study.py --quick --out /tmp/ps-quick                # CPU smoke test
    python experiments/pretrained_study.py --phase report --out docs/results/pretrained
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ggprior.codec import ggmodel, load_compressed, save_compressed
from ggprior.codec import quantizer as quant
from ggprior.codec.histogram import Histogram
from ggprior.codec.lengths import STEP_BITS, tensor_bits
from ggprior.deepshape import BIN_WIDTH, reshape_values, select_names
from ggprior.io.sources import open_source
from ggprior.tasks import get_tokenizer, load_minilm, load_task
from ggprior.tasks.data import task_split
from ggprior.train import TrainConfig, evaluate, make_rate_callback, train
from ggprior.train.backslash import reference_lambda

TASKS = ("sentiment", "spam", "topic")
MAX_LEN = {"sentiment": 64, "spam": 64, "topic": 128}
CODERS = ("fl", "eg", "huffman", "ans")
RELS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
FAITHFUL = 0.01
MULTIPLES = ("matched", 0.5, 1.0, 2.0, 4.0, 8.0)  # x the reference lambda 2e3; "matched": x N / 110M
METHODS = {  # name -> (rate kind, update)
    "plain": ("none", None), "l1": ("l1", "subgradient"),
    "bs_sub": ("backslash", "subgradient"), "bs_prox": ("backslash", "proximal"),
}
DS_METHODS = ("plain", "bs_prox")
K_GAMMA, K_BETA = 1.1, 0.7
TOLERANCE = 0.01  # accuracy loss allowed against the plain fine-tune (1 point)
LR, EPOCHS, BATCH = 1e-4, 3, 32


# ----------------------------------------------------------------------------- helpers

def n_weights(sd: dict) -> int:
    return sum(t.numel() for t in sd.values() if t.is_floating_point())


def group_of(name: str) -> str:
    if "word_embeddings" in name:
        return "word_embeddings"
    if ".encoder." in name and name.endswith(".weight") and "LayerNorm" not in name:
        return "encoder_matrices"
    return "other"


def rate_point(model, sd: dict, rel: float, data: dict, device) -> dict:
    """Quantize every floating tensor at relative error ``rel``; code lengths + decoded accuracy.

    The code lengths are those of ``ggprior.codec.measure`` (tensor_bits + the step) for
    the coders in CODERS, computed from one quantization pass on the tensors' device.
    """
    bits = {c: 0.0 for c in CODERS}
    gbits: dict[str, float] = {}
    gcount: dict[str, int] = {}
    deq, zeros, n = {}, 0, 0
    for name, t in sd.items():
        if not t.is_floating_point() or t.numel() == 0:
            deq[name] = t
            continue
        s = quant.choose_step(t, rel=rel, name=name)
        q = quant.quantize(t, s, name=name)
        sym, cnt = torch.unique(q, return_counts=True)
        h = Histogram(sym.cpu().numpy().astype(np.int64), cnt.cpu().numpy().astype(np.int64))
        tb = tensor_bits(h, CODERS, gg=ggmodel.fit(h, "moment"))
        for c in CODERS:
            bits[c] += tb[c] + STEP_BITS
        g = group_of(name)
        gbits[g] = gbits.get(g, 0.0) + tb["ans"] + STEP_BITS
        gcount[g] = gcount.get(g, 0) + t.numel()
        zeros += int(cnt[sym == 0].sum()) if bool((sym == 0).any()) else 0
        n += t.numel()
        deq[name] = quant.dequantize(q, s, t.dtype)
    model.load_state_dict(deq)
    row = {"rel": rel, "bpw": {c: bits[c] / n for c in CODERS}, "q_zero_frac": zeros / n,
           "bpw_groups": {g: gbits[g] / gcount[g] for g in gbits}}
    for split in ("validation", "test"):
        row[f"{split}_acc"] = evaluate(model, data[split])["accuracy"]
    model.load_state_dict(sd)
    return row


def weight_stats(sd: dict) -> dict:
    mats = [t for t in sd.values() if t.is_floating_point() and t.dim() >= 2]
    n = sum(t.numel() for t in mats)
    return {"matrix_exact_zero_frac": sum(int((t == 0).sum()) for t in mats) / n,
            "matrix_abs_mean": float(sum(float(t.abs().sum()) for t in mats) / n)}


def deepshape_model_(model) -> dict:
    """DeepShape every weight matrix in place (2^-13 grid, then 2^-17); tensors neither grid fits are skipped."""
    params = dict(model.named_parameters())
    done, skipped = 0, []
    for name in select_names(open_source(params), "matrices"):
        p = params[name]
        for width in (BIN_WIDTH, BIN_WIDTH / 16):
            try:
                new, _ = reshape_values(p.detach(), K_GAMMA, K_BETA, bin_width=width, name=name)
            except ValueError as e:
                reason = str(e)
                continue
            with torch.no_grad():
                p.copy_(new)
            done += 1
            break
        else:
            skipped.append({"name": name, "reason": reason[:160]})
    return {"reshaped": done, "skipped": skipped}


# ----------------------------------------------------------------------------- phase 1: train

_DATA: dict = {}


def task_data(task: str, quick: bool, max_train: int | None = None) -> dict:
    if task not in _DATA:
        tok = get_tokenizer("minilm")
        lim = {"train": 48, "validation": 64, "test": 64} if quick else {"train": max_train}
        _DATA[task] = {s: load_task(task, s, tok, MAX_LEN[task], max_examples=lim.get(s)) for s in
                       ("train", "validation", "test")}
        for s in ("validation", "test"):  # evaluation batches of similar lengths: less padding, same accuracy
            d = _DATA[task][s]
            order = torch.argsort(d.tensors["attention_mask"].sum(1), stable=True)
            d.tensors = {k: v[order] for k, v in d.tensors.items()}
    return _DATA[task]


def job_list(args) -> list[dict]:
    jobs = []
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                for mult in ([None] if method == "plain" else args.multiples):
                    jobs.append({"task": task, "seed": seed, "method": method, "mult": mult})
    # plain first (its models are the baselines other studies reuse), bs_sub last (if the time budget
    # runs out, the plain / L1 / proximal comparison is complete), then the longest jobs first
    cost = {"sentiment": 5, "spam": 2, "topic": 1.5}
    jobs.sort(key=lambda j: (j["method"] != "plain", j["method"] == "bs_sub",
                             -(cost[j["task"]] * (1.4 if j["method"] in DS_METHODS else 1))))
    return jobs


def variant_name(method: str, mult, ds: bool = False) -> str:
    base = method if mult is None else f"{method}@{mult}"
    return base + ("+ds" if ds else "")


def run_job(job: dict, args_d: dict) -> list[dict]:
    torch.set_num_threads(1)
    quick, device = args_d["quick"], torch.device(args_d["device"])
    task, seed, method, mult = job["task"], job["seed"], job["method"], job["mult"]
    data = task_data(task, quick, args_d["max_train"])
    torch.manual_seed(seed)
    model = load_minilm(data["train"].num_labels).float().to(device)  # fp32 even from an fp16 copy
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    kind, update = METHODS[method]
    lam = None
    if mult is not None:
        lam = reference_lambda(n, 1.0, match_size=True) if mult == "matched" else reference_lambda(n, float(mult))
    cb = make_rate_callback(kind, lam or 0.0, update=update or "subgradient")
    epochs = args_d["epochs"]
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=args_d["lr"], seed=seed, device=str(device), progress=False)
    t0 = time.perf_counter()
    res = train(model, data["train"], data["validation"], cfg, [cb] if cb else [], test_data=data["test"])
    rows = []

    def record(variant: str, res: dict, extra: dict) -> None:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path = Path(args_d["work"]) / "models" / f"{task}-s{seed}-{variant}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(path))
        fp32 = {s: evaluate(model, data[s])["accuracy"] for s in ("validation", "test")}
        grid = [rate_point(model, sd, rel, data, device) for rel in args_d["rels"]]
        hist = res["history"]
        rows.append({"task": task, "seed": seed, "method": method, "mult": mult, "lam": lam, "variant": variant,
                     "model_path": str(path), "weights": n_weights(sd), "fp32": fp32, "grid": grid,
                     "train_seconds": res["seconds"], "steps": res["steps"],
                     "history": [{k: h.get(k) for k in ("epoch", "train_loss", "validation_accuracy",
                                                        "rate_nu_mean", "rate_exact_zero_frac")} for h in hist],
                     **weight_stats(sd), **extra})

    record(variant_name(method, mult), res, {"lam_reference_multiple": mult})
    if method in DS_METHODS and args_d["deepshape"]:
        info = deepshape_model_(model)
        after_reshape = evaluate(model, data["validation"])["accuracy"]
        cb2 = make_rate_callback(kind, (lam or 0.0) / 10, update=update or "subgradient")
        cfg2 = TrainConfig(epochs=1, batch_size=BATCH, lr=args_d["lr"] / 10, seed=seed + 1, device=str(device), progress=False)
        res2 = train(model, data["train"], data["validation"], cfg2, [cb2] if cb2 else [])
        record(variant_name(method, mult, True), res2,
               {"deepshape": {**info, "val_acc_after_reshape": after_reshape}, "lam_reference_multiple": mult})
    print(f"[{time.strftime('%H:%M:%S')}] done {task} s{seed} {variant_name(method, mult)} "
          f"{time.perf_counter() - t0:.0f}s val {rows[0]['fp32']['validation']:.3f} "
          f"zeros {rows[0]['matrix_exact_zero_frac']:.3f} "
          f"bpw@1% {next(g['bpw']['ans'] for g in rows[0]['grid'] if g['rel'] == FAITHFUL) if FAITHFUL in args_d['rels'] else float('nan'):.2f}",
          flush=True)
    return rows


def _job_entry(a):
    job, args_d = a
    if args_d.get("train_deadline") and time.time() > args_d["train_deadline"]:
        return [{"error": f"{job}: skipped, past the training deadline"}]
    try:
        return run_job(job, args_d)
    except Exception as e:  # keep the other jobs' results
        import traceback

        return [{"error": f"{job}: {e!r}", "traceback": traceback.format_exc()[-2000:]}]


def phase_train(args) -> list[dict]:
    args_d = {"quick": args.quick, "device": args.device, "epochs": args.epochs, "rels": list(args.rels),
              "max_train": args.max_train, "lr": args.lr,
              "work": str(args.work), "deepshape": not args.no_deepshape,
              "train_deadline": args.t0 + 0.6 * args.budget if args.budget else None}
    jobs = job_list(args)
    print(f"{len(jobs)} training jobs on {args.workers} workers", flush=True)
    rows: list[dict] = []
    partial = args.out / "train_rows.json"
    if args.workers <= 1:
        for j in jobs:
            rows.extend(_job_entry((j, args_d)))
    else:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(_job_entry, [(j, args_d) for j in jobs]):
                rows.extend(r)
                partial.write_text(json.dumps(rows))
    partial.write_text(json.dumps(rows))
    return rows


# ----------------------------------------------------------------------------- phase 2: code

def tfidf_reference(task: str, max_train: int | None = None) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from ggprior.tasks.data import _subset

    x = {s: task_split(task, s) for s in ("train", "validation", "test")}
    keep = _subset(len(x["train"][0]), max_train, 0)  # the fine-tunes' subset (load_task, split_seed 0)
    x["train"] = ([x["train"][0][i] for i in keep], [x["train"][1][i] for i in keep])
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    xtr = vec.fit_transform(x["train"][0])
    best = None
    for c in (1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, x["train"][1])
        val = float(clf.score(vec.transform(x["validation"][0]), x["validation"][1]))
        if best is None or val > best[0]:
            best = (val, c, float(clf.score(vec.transform(x["test"][0]), x["test"][1])))
    return {"validation_acc": best[0], "C": best[1], "test_acc": best[2],
            "model": "TF-IDF (1-2 grams, sublinear tf) + logistic regression, C chosen on validation"}


def aggregate(rows: list[dict], task: str) -> dict:
    """Per variant: seeds, mean fp32 accuracy, mean grid (per rel) over seeds."""
    out: dict = {}
    for r in rows:
        if r.get("task") != task:
            continue
        v = out.setdefault(r["variant"], {"variant": r["variant"], "method": r["method"], "mult": r["mult"],
                                          "lam": r["lam"], "seeds": [], "rows": []})
        v["seeds"].append(r["seed"])
        v["rows"].append(r)
    for v in out.values():
        rs = v["rows"]
        v["fp32_val"] = float(np.mean([r["fp32"]["validation"] for r in rs]))
        v["fp32_test"] = float(np.mean([r["fp32"]["test"] for r in rs]))
        v["zero_frac"] = float(np.mean([r["matrix_exact_zero_frac"] for r in rs]))
        v["fp32_validation_per_seed"] = [r["fp32"]["validation"] for r in rs]
        v["fp32_test_per_seed"] = [r["fp32"]["test"] for r in rs]
        v["history_per_seed"] = [r["history"] for r in rs]
        v["train_seconds_per_seed"] = [r["train_seconds"] for r in rs]
        v["deepshape_per_seed"] = [r.get("deepshape") for r in rs]
        rels = sorted({g["rel"] for g in rs[0]["grid"]})
        v["grid"] = []
        for rel in rels:
            gs = [next(g for g in r["grid"] if g["rel"] == rel) for r in rs]
            v["grid"].append({"rel": rel, "val": float(np.mean([g["validation_acc"] for g in gs])),
                              "test": float(np.mean([g["test_acc"] for g in gs])),
                              "bpw": {c: float(np.mean([g["bpw"][c] for g in gs])) for c in CODERS},
                              "bpw_groups": {k: float(np.mean([g["bpw_groups"][k] for g in gs]))
                                             for k in gs[0]["bpw_groups"]},
                              "q_zero_frac": float(np.mean([g["q_zero_frac"] for g in gs]))})
    return out


def family(variant: str) -> str:
    base = variant.split("@")[0].split("+")[0]
    return base + ("+ds" if variant.endswith("+ds") else "")


def select_points(agg: dict, nseeds: int) -> dict:
    plain = agg.get("plain")
    if plain is None:
        return {}
    floor = plain["fp32_val"] - TOLERANCE
    best: dict = {}
    for v in agg.values():
        if len(v["seeds"]) < nseeds:
            continue
        for g in v["grid"]:
            if g["val"] >= floor - 1e-12:
                f = family(v["variant"])
                cand = {"variant": v["variant"], "rel": g["rel"], "bpw_ans_est": g["bpw"]["ans"], "val": g["val"],
                        "test": g["test"]}
                if f not in best or cand["bpw_ans_est"] < best[f]["bpw_ans_est"]:
                    best[f] = cand
    if best:
        best["overall"] = dict(min((b for b in best.values()), key=lambda b: b["bpw_ans_est"]))
    best["plain_faithful"] = {"variant": "plain", "rel": FAITHFUL}
    return {"floor_val": floor, "points": best}


def _ggz_job(a) -> dict:
    torch.set_num_threads(1)
    model_path, ggz, coder, rel = a
    sd = load_file(model_path)
    t = time.perf_counter()
    head = save_compressed(sd, ggz, coder=coder, rel_error=rel, include="all")
    enc = time.perf_counter() - t
    t = time.perf_counter()
    dec = load_compressed(ggz)
    dec_s = time.perf_counter() - t
    q = [c["qcrc32"] for e in head["tensors"] if e.get("encoding") == "quantized" for c in e["chunks"]]
    same = all(torch.equal(dec[k].float(), quant.dequantize(quant.quantize(sd[k], e["step"]), e["step"]).float())
               for e in head["tensors"] if e.get("encoding") == "quantized" for k in [e["name"]])
    return {"ggz": ggz, "coder": coder, "rel": rel, "file_bytes": head["file_bytes"], "weights": n_weights(sd),
            "bpw_file": head["file_bytes"] * 8 / n_weights(sd), "encode_s": enc, "decode_s": dec_s,
            "qcrc": hash(tuple(q)), "decoded_equals_quantized": bool(same)}


def phase_code(args, rows: list[dict]) -> dict:
    good = [r for r in rows if "error" not in r]
    errors = [r for r in rows if "error" in r]
    results: dict = {"config": {"tasks": args.tasks, "seeds": args.seeds, "methods": args.methods,
                                "multiples": [str(m) for m in args.multiples], "rels": list(args.rels),
                                "faithful_rel": FAITHFUL, "lr": args.lr, "max_train": args.max_train, "epochs": args.epochs, "batch": BATCH,
                                "max_len": MAX_LEN, "k_gamma": K_GAMMA, "k_beta": K_BETA, "tolerance": TOLERANCE,
                                "quick": args.quick, "device": args.device,
                                "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                "fp16_start": bool(os.environ.get("GGPRIOR_FP16_START"))},
                     "errors": errors, "tasks": {}}
    jobs, where = [], []
    for task in args.tasks:
        agg = aggregate(good, task)
        sel = select_points(agg, len(args.seeds))
        tr = {"tfidf_lr": tfidf_reference(task, args.max_train), "selection": sel,
              "variants": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in agg.items()}}
        results["tasks"][task] = tr
        pts = sel.get("points", {})
        todo = {}
        late = args.budget and time.time() > args.t0 + 0.8 * args.budget
        for key, p in pts.items():
            if late and key not in ("overall", "plain_faithful"):
                continue  # out of time: only the two points that carry the claims
            coders = CODERS if key in ("overall", "plain_faithful") else ("ans",)
            k2 = (p["variant"], p["rel"])
            todo.setdefault(k2, set()).update(coders)
        for (variant, rel), coders in todo.items():
            for r in agg[variant]["rows"]:
                for c in sorted(coders):
                    ggz = str(Path(args.work) / "ggz" / f"{task}-s{r['seed']}-{variant}-rel{rel}-{c}.ggz")
                    jobs.append((r["model_path"], ggz, c, rel))
                    where.append((task, variant, rel, r["seed"], c))
    (Path(args.work) / "ggz").mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} .ggz files", flush=True)
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            outs = pool.map(_ggz_job, jobs)
    else:
        outs = [_ggz_job(j) for j in jobs]
    # decoded accuracy: evaluate each (task, variant, rel, seed) from its ANS file (or first coder)
    device = torch.device(args.device)
    files: dict = {}
    for (task, variant, rel, seed, c), o in zip(where, outs, strict=True):
        files.setdefault((task, variant, rel, seed), []).append({**o, "coder": c})
    for (task, variant, rel, seed), fl in files.items():
        data = task_data(task, args.quick, args.max_train)
        torch.manual_seed(seed)
        model = load_minilm(data["train"].num_labels).float().to(device)
        pick = next((f for f in fl if f["coder"] == "ans"), fl[0])
        model.load_state_dict({k: v.to(device) for k, v in load_compressed(pick["ggz"]).items()})
        acc = {s: evaluate(model, data[s])["accuracy"] for s in ("validation", "test")}
        same_ints = len({f["qcrc"] for f in fl}) == 1
        entry = results["tasks"][task].setdefault("ggz", {}).setdefault(f"{variant}@rel{rel}", {})
        entry[str(seed)] = {"decoded_validation_acc": acc["validation"], "decoded_test_acc": acc["test"],
                            "same_integers_all_coders": same_ints,
                            "files": {f["coder"]: {k: f[k] for k in ("file_bytes", "bpw_file", "encode_s", "decode_s",
                                                                     "decoded_equals_quantized")} for f in fl}}
    return results


# ----------------------------------------------------------------------------- phase 3: report

FAMILIES = ("plain", "plain+ds", "l1", "bs_sub", "bs_prox", "bs_prox+ds")
COLORS = {"plain": "#444", "plain+ds": "#999", "l1": "#d62", "bs_sub": "#28c", "bs_prox": "#2a4", "bs_prox+ds": "#8c4"}


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -1.0
    for b, a in sorted(points):
        if a > best:
            front.append((b, a))
            best = a
    return front


def phase_report(args, results: dict) -> None:
    from ggprior.report.plots import plt, save_figure

    out = args.out
    tasks = list(results["tasks"])
    lines = ["# Pretrained MiniLM fine-tuning: results", "",
             f"Device: {results['config'].get('device_name')}; seeds {results['config']['seeds']}; "
             f"faithful rule: relative RMS error {FAITHFUL:.0%} per tensor; "
             f"tolerance {TOLERANCE * 100:.0f} point on mean validation accuracy.", ""]
    if results.get("errors"):
        import ast
        import collections

        miss = collections.Counter()
        other = []
        for e in results["errors"]:
            job, _, why = e["error"].partition("}: ")
            if "skipped" in why:
                j = ast.literal_eval(job + "}")
                miss[f"{j['task']} {j['method']}"] += 1
            else:
                other.append(e["error"][:300])
        if miss:
            lines += ["Not run (skipped at the device time budget; count of (seed, lambda) jobs): "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(miss.items())) + ".", ""]
        if other:
            lines += [f"**{len(other)} jobs failed**: " + "; ".join(other), ""]
    # --- baselines
    lines += ["## Baselines (test accuracy, %)", "", "| task | TF-IDF + LR | plain fine-tune (fp32, per seed) | mean |",
              "|---|---|---|---|"]
    for t in tasks:
        tr = results["tasks"][t]
        p = tr["variants"].get("plain")
        per = ", ".join(_pct(r) for r in ([] if p is None else [x for x in _seed_vals(p, "test")]))
        lines.append(f"| {t} | {_pct(tr['tfidf_lr']['test_acc'])} | {per} | {_pct(p and p['fp32_test'])} |")
    # --- every variant at the faithful rule
    for t in tasks:
        tr = results["tasks"][t]
        lines += ["", f"## {t}: every variant (mean over seeds)", "",
                  f"Decoded accuracy and estimated bits/weight at the faithful rule (rel {FAITHFUL:.0%}); the last "
                  "columns give the lowest-rate rel whose mean validation accuracy stays within 1 point of plain.", "",
                  "| variant | lambda | exact zeros (matrices) | fp32 val | fp32 test | @1%: test | @1%: FL | EG | Huffman | ANS "
                  "| ANS enc. matrices | ANS word emb. | best rel <=1pt | its ANS bpw | its test |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        floor = tr["selection"].get("floor_val", 0)
        for name, v in sorted(tr["variants"].items(), key=lambda kv: (FAMILIES.index(family(kv[0])), str(kv[1]["mult"]))):
            g = next((g for g in v["grid"] if g["rel"] == FAITHFUL), None)
            ok = [x for x in v["grid"] if x["val"] >= floor - 1e-12]
            b = min(ok, key=lambda x: x["bpw"]["ans"]) if ok else None
            lam = "" if v["lam"] is None else f"{v['lam']:.0f} ({v['mult']})"
            row = [name, lam, _pct(v["zero_frac"]), _pct(v["fp32_val"]), _pct(v["fp32_test"])]
            if g:
                row += [_pct(g["test"])] + [f"{g['bpw'][c]:.2f}" for c in CODERS] + [
                    f"{g['bpw_groups'].get('encoder_matrices', float('nan')):.2f}",
                    f"{g['bpw_groups'].get('word_embeddings', float('nan')):.2f}"]
            else:
                row += [""] * 7
            row += [f"{b['rel']:g}", f"{b['bpw']['ans']:.2f}", _pct(b["test"])] if b else ["none", "", ""]
            lines.append("| " + " | ".join(row) + " |")
    # --- real files
    lines += ["", "## Real `.ggz` files at the operating points", "",
              "Chosen on mean validation accuracy (decoded) within 1 point of the plain fine-tune's fp32 mean; "
              "test accuracy of the model decoded from the file. bits/weight = file bytes x 8 / floating values.", "",
              "| task | point | variant | rel | seed | FL | EG | Huffman | ANS | decoded test | plain fp32 test | loss (pts) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        tr = results["tasks"][t]
        plain = tr["variants"].get("plain")
        pts = tr["selection"].get("points", {})
        for key in ("plain_faithful", "overall", *FAMILIES):
            p = pts.get(key)
            if p is None or key in FAMILIES and p.get("variant") == pts.get("overall", {}).get("variant") and \
                    p.get("rel") == pts.get("overall", {}).get("rel"):
                continue
            e = tr.get("ggz", {}).get(f"{p['variant']}@rel{p['rel']}", {})
            for seed, d in sorted(e.items()):
                fb = {c: f"{d['files'][c]['bpw_file']:.3f}" if c in d["files"] else "" for c in CODERS}
                ptest = next((r for s, r in zip(plain["seeds"], _seed_vals(plain, "test"), strict=False) if str(s) == seed), None)
                loss = "" if ptest is None else f"{100 * (ptest - d['decoded_test_acc']):+.1f}"
                lines.append(f"| {t} | {key} | {p['variant']} | {p['rel']:g} | {seed} | {fb['fl']} | {fb['eg']} | "
                             f"{fb['huffman']} | {fb['ans']} | {_pct(d['decoded_test_acc'])} | {_pct(ptest)} | {loss} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    # --- figure 1: rate-accuracy per task (mean over seeds, decoded test accuracy)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        tr = results["tasks"][t]
        for f in FAMILIES:
            pts = [(g["bpw"]["ans"], g["test"]) for n, v in tr["variants"].items() if family(n) == f for g in v["grid"]]
            if not pts:
                continue
            ax.scatter(*zip(*pts, strict=True), s=8, color=COLORS[f], alpha=0.35)
            ax.plot(*zip(*_pareto(pts), strict=True), "-o", ms=3, color=COLORS[f], label=f)
        p = tr["variants"].get("plain")
        if p:
            ax.axhline(p["fp32_test"], color="k", lw=0.8, ls="--", label="plain fp32")
            ax.axhline(p["fp32_test"] - TOLERANCE, color="k", lw=0.8, ls=":", label="plain - 1 pt")
        ax.axhline(tr["tfidf_lr"]["test_acc"], color="m", lw=0.8, ls="-.", label="TF-IDF + LR")
        ax.axvline(2.0, color="r", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits/weight (ANS, estimated; all floating tensors)")
        ax.set_ylabel("decoded test accuracy")
        ax.set_title(f"{t}: upper-left envelope per method")
        lo = min([g["test"] for v in tr["variants"].values() for g in v["grid"] if g["rel"] <= 0.04] or [0.5])
        ax.set_ylim(max(0.0, lo - 0.03), 1.0)
    axes[0][0].legend(fontsize=7, loc="lower right")
    save_figure(fig, out / "rate_accuracy.png")
    # --- figure 2: lambda sweep (exact zeros, bpw at the faithful rule, fp32 validation accuracy)
    fig, axes = plt.subplots(3, len(tasks), figsize=(5.0 * len(tasks), 8.5), squeeze=False)
    for j, t in enumerate(tasks):
        tr = results["tasks"][t]
        for f in ("l1", "bs_sub", "bs_prox", "bs_prox+ds"):
            vs = sorted([v for n, v in tr["variants"].items() if family(n) == f], key=lambda v: v["lam"])
            if not vs:
                continue
            lam = [v["lam"] for v in vs]
            axes[0][j].plot(lam, [v["zero_frac"] for v in vs], "-o", color=COLORS[f], label=f)
            axes[1][j].plot(lam, [next(g["bpw"]["ans"] for g in v["grid"] if g["rel"] == FAITHFUL) for v in vs], "-o",
                            color=COLORS[f], label=f)
            axes[2][j].plot(lam, [v["fp32_val"] for v in vs], "-o", color=COLORS[f], label=f)
        p = tr["variants"].get("plain")
        if p:
            axes[1][j].axhline(next(g["bpw"]["ans"] for g in p["grid"] if g["rel"] == FAITHFUL), color="k", ls="--",
                               label="plain")
            axes[2][j].axhline(p["fp32_val"], color="k", ls="--", label="plain")
            axes[2][j].axhline(p["fp32_val"] - TOLERANCE, color="k", ls=":")
        for i, lab in enumerate(("exact zeros in matrices", f"bits/weight (ANS) at rel {FAITHFUL:.0%}",
                                 "validation accuracy (fp32)")):
            axes[i][j].set_xscale("log")
            axes[i][j].set_ylabel(lab)
        axes[0][j].set_title(t)
        axes[2][j].set_xlabel("lambda (step lambda nu / N; 2000 = reference)")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    save_figure(fig, out / "lambda_sweep.png")
    print(f"wrote {out / 'results.md'}, rate_accuracy.png, lambda_sweep.png")


def _seed_vals(v: dict, split: str) -> list[float]:
    return v.get(f"fp32_{split}_per_seed", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/pretrained"))
    ap.add_argument("--work", type=Path, default=None, help="models and .ggz files (default OUT/work)")
    ap.add_argument("--phase", choices=("all", "train", "code", "train+code", "report"), default="all")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--multiples", default=",".join(str(m) for m in MULTIPLES))
    ap.add_argument("--rels", default=",".join(str(r) for r in RELS))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--max-train", type=int, default=None, help="a seeded random subset of N training examples (CPU-sized runs; the TF-IDF reference trains on the same subset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-deepshape", action="store_true")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds: training jobs not started by 60%% of it are skipped; past 80%% only the two "
                         "main operating points are written as .ggz (0: no limit)")
    ap.add_argument("--quick", action="store_true", help="tiny data (48 train / 64 eval examples), 1 epoch")
    args = ap.parse_args()
    args.tasks = args.tasks.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    args.multiples = [m if m == "matched" else float(m) for m in args.multiples.split(",")]
    args.rels = [float(r) for r in args.rels.split(",")]
    if args.quick:
        args.epochs = 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    t0 = time.perf_counter()
    args.t0 = time.time()
    if args.phase in ("all", "train", "train+code"):
        rows = phase_train(args)
        print(f"train phase {time.perf_counter() - t0:.0f}s", flush=True)
    elif args.phase == "code":
        rows = json.loads((args.out / "train_rows.json").read_text())
    if args.phase in ("all", "code", "train+code"):
        results = phase_code(args, rows)
        results["seconds"] = time.perf_counter() - t0
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"code phase done, {time.perf_counter() - t0:.0f}s total", flush=True)
    if args.phase in ("all", "report"):
        phase_report(args, json.loads((args.out / "results.json").read_text()))


if __name__ == "__main__":
    main()
