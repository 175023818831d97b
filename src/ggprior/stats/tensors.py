"""GG statistics of a whole model: every tensor, every layer group, and the pooled model.

Rows (plain dicts, ready for :func:`ggprior.io.write_table`):
- one per floating tensor (``name`` = the tensor's name);
- one per group, ``group:<g>`` with g in attention, mlp, embeddings, norms, biases, other
  (by name pattern, see :func:`tensor_group`);
- ``__linear__``: every weight matrix (>= 2-D) outside embeddings and norms pooled, the
  row that describes "the weights" of the model;
- ``__model__``: every floating tensor pooled, the paper's Table 1 "model" row. On models
  with LayerNorm gains near 1 this pool is far from zero-centred and its gamma is tiny
  (MiniLM: about 0.08); read it beside ``__linear__``.

Every fit (tensor or pool) is an exact moment fit over all values (float64 sums, streamed).
Pass 1 fits each tensor in one pass (:func:`ggprior.gg.moments.fit_moments`, numba; equal to
the two-pass :func:`ggprior.gg.fit` to about 1e-9), and a pool adds its members' counts and
sums; pass 2 reads each tensor once more for the centred sums of its pools around the pools'
means (:func:`ggprior.gg.fit.centred_sums`, the one kernel of the two-pass fits). Goodness of fit of a row is measured on at most
``max_gof_values`` values (default 65,536): the whole tensor when it is smaller, else a seeded
uniform subsample (pools sample each member in proportion). It runs in a background thread while
pass 2 reads the next tensors (``GOF_AHEAD`` rows at most waiting); the rows are the same as in turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import gg
from ..gg.moments import fit_moments
from ..io.sources import TensorSource, floating_names, open_source

GROUP_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("norms", re.compile(r"norm|(^|\.)ln_|(^|\.)ln\d*\.|layer_norm")),
    ("embeddings", re.compile(r"embed|(^|\.)wte\.|(^|\.)wpe\.|embed_tokens|lm_head")),
    ("biases", re.compile(r"bias$")),
    ("attention", re.compile(r"attention|attn|(q|k|v|o)_proj|query|key|value")),
    ("mlp", re.compile(r"mlp|intermediate|ffn|fc\d|c_fc|gate_proj|up_proj|down_proj|\.output\.dense")),
)
GROUPS = tuple(g for g, _ in GROUP_PATTERNS) + ("other",)
MODEL_ROW = "__model__"
LINEAR_ROW = "__linear__"
GOF_AHEAD = 4
"""Rows whose goodness of fit may still be pending while pass 2 reads on (their samples held)."""


def tensor_group(name: str) -> str:
    """The layer group of a tensor name: the first of GROUPS whose pattern matches."""
    low = name.lower()
    for group, pat in GROUP_PATTERNS:
        if pat.search(low):
            return group
    return "other"


def is_linear_weight(name: str, ndim: int) -> bool:
    """A weight matrix of a linear/conv layer (>= 2-D, not an embedding or a norm)."""
    return ndim >= 2 and tensor_group(name) not in ("embeddings", "norms")


@dataclass
class _Pool:
    acc: gg.MomentAccumulator
    members: list[str] = field(default_factory=list)
    sample: list[torch.Tensor] = field(default_factory=list)


def _subsample(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    x = x.reshape(-1)
    if x.numel() <= k:
        return x.to(torch.float64)
    idx = torch.randint(0, x.numel(), (k,), generator=gen)
    return x[idx.to(x.device)].to(torch.float64)


def _row(name: str, fit: gg.GGFit, values: torch.Tensor | None, extra: Mapping) -> dict:
    row = {"name": name, **extra, "numel": fit.n, "mu": fit.mu, "beta": fit.beta, "gamma": fit.gamma,
           "std": fit.std, "gamma_at_bound": fit.at_bound, "fit_method": fit.method,
           "entropy_bits": fit.entropy_bits}
    if values is not None and values.numel() > 1 and float(values.std()) > 0:
        row.update(gg.goodness_of_fit(values, fit).to_dict())
    return row


def fit_model(
    source,
    *,
    mle: bool = False,
    gof: bool = True,
    max_gof_values: int = 1 << 16,
    names: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    pool_samples: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """Fit every floating tensor, group and the pooled model of ``source``; return the rows.

    ``source`` is anything :func:`ggprior.io.open_source` accepts. ``mle`` refines each
    tensor's moment fit by maximum likelihood (pools stay moment fits). Tensors that are
    constant (a freshly initialised LayerNorm) or too small get a row without a fit.
    ``pool_samples``, if given, is filled with each pooled row's goodness-of-fit sample
    (the plots use it). Every tensor is read in chunks, so files larger than memory work.
    """
    src: TensorSource = open_source(source)
    names = floating_names(src) if names is None else names
    if not names:
        raise ValueError(f"{src.label}: no floating-point tensors to fit")
    if gof and max_gof_values < 1:
        raise ValueError(f"max_gof_values must be >= 1, got {max_gof_values}")
    gen = torch.Generator().manual_seed(seed)
    total = sum(src.numel(n) for n in names)
    pools: dict[str, _Pool] = {MODEL_ROW: _Pool(gg.MomentAccumulator(f"{src.label} (model)"))}
    skipped: list[dict] = []

    # Pass 1: the one-pass fit of every tensor; a pool adds its members' counts and sums.
    fits: dict[str, gg.GGFit | ValueError] = {}
    counts: dict[str, int] = {}
    member_of: dict[str, list[_Pool]] = {}
    for name in tqdm(names, desc="fit pass 1", unit="tensor", disable=not progress):
        members = [MODEL_ROW, f"group:{tensor_group(name)}"]
        if is_linear_weight(name, len(src.shape(name))):
            members.append(LINEAR_ROW)
        try:
            fit = fits[name] = fit_moments(lambda name=name: src.iter_chunks(name), name=name)
            n, s1 = fit.n, fit.mu * fit.n
        except ValueError as e:  # empty or constant: no fit, but the pools still hold its values
            fits[name] = e
            acc = gg.MomentAccumulator(name)
            for c in src.iter_chunks(name):
                acc.add(c)  # NaN / Inf raise here, as the fit did
            n, s1 = acc.n, acc.s1
        counts[name] = n
        member_of[name] = [pools.setdefault(m, _Pool(gg.MomentAccumulator(f"{src.label} ({m})"))) for m in members]
        for pool in member_of[name]:
            pool.acc.add_sums(n, s1)
            pool.members.append(name)

    # Pass 2: centred moments of every pool around its own mean, and the GOF samples. The goodness
    # of fit of a row (one torch thread) runs in a background thread while the next tensor is read.
    with ThreadPoolExecutor(1) as background:
        done: list[Future] = []  # the rows, in order
        for name in tqdm(names, desc="fit pass 2", unit="tensor", disable=not progress):
            sample = []
            for c in src.iter_chunks(name):
                c = c.reshape(-1)
                for pool in member_of[name]:
                    pool.acc.add_centered(c)
                if gof and c.numel():
                    sample.append(_subsample(c, max(1, max_gof_values * c.numel() // counts[name]), gen))
                    for pool in member_of[name]:
                        pool.sample.append(_subsample(c, max(1, max_gof_values * c.numel() // pool.acc.n), gen))
            extra = {"group": tensor_group(name), "shape": "x".join(map(str, src.shape(name)))}
            fit = fits[name]
            if isinstance(fit, ValueError):
                skipped.append({"name": name, **extra, "numel": src.numel(name), "note": str(fit)})
                continue
            if mle:
                fit = gg.refine_mle(lambda name=name: src.iter_chunks(name), fit, name=name)
            if len(done) > GOF_AHEAD:  # bound the samples waiting for their goodness of fit
                done[-GOF_AHEAD - 1].result()
            done.append(background.submit(_row, name, fit, torch.cat(sample) if sample else None, extra))
        pooled: list[Future] = []
        for key in [MODEL_ROW, LINEAR_ROW, *(f"group:{g}" for g in GROUPS)]:
            if key not in pools:
                continue
            pool = pools[key]
            extra = {"group": key, "shape": f"{len(pool.members)} tensors"}
            try:
                fit = pool.acc.fit()
            except ValueError as e:
                pooled.append(background.submit(dict, name=key, **extra, numel=pool.acc.n, note=str(e)))
                continue
            values = torch.cat(pool.sample) if gof else None
            if pool_samples is not None and values is not None:
                pool_samples[key] = values
            pooled.append(background.submit(_row, key, fit, values, extra))
        rows = [f.result() for f in done]
        pool_rows = [f.result() for f in pooled]
    assert sum(r["numel"] for r in rows) + sum(r["numel"] for r in skipped) == total
    if not rows and all("note" in r for r in pool_rows):
        raise ValueError(f"{src.label}: nothing to fit ({skipped[0]['note'] if skipped else pool_rows[0]['note']})")
    return pool_rows + rows + skipped
