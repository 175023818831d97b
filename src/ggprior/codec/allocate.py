"""GG-model bit allocation: each tensor's quantization step for a target size (docs/rate_distortion.md).

Every tensor ``j`` is summarised by its fitted GG (mu ~ 0, beta_j, gamma_j), its size ``n_j``
and a sensitivity weight ``w_j`` (mean squared gradient, input-activation power, or 1). For a
uniform quantizer of step ``s`` (rounding, or a dead zone of threshold ``t`` steps) the GG gives,
per weight,

    H_j(s) = entropy (bits) of the GG mass of the quantizer's bins       (the rate, ideal coder)
    D_j(s) = E[(X - Q(X))^2]                                           (the distortion)

exactly, from partial moments of the GG (regularised incomplete gamma functions) over the
bins near the mode and the high-rate form over the far tail (:func:`rd_table`); at high rate
they tend to ``h(X) - log2 s`` and ``s^2 / 12``. The allocation minimises ``sum_j w_j n_j D_j``
subject to ``sum_j (n_j H_j + side_j) <= B N``: for a Lagrange multiplier ``lam`` each tensor
takes the step minimising ``w_j n_j D_j(s) + lam n_j H_j(s)`` (equal slope ``w_j dD_j/dR_j =
-lam``; reverse water-filling: a tensor whose slope never reaches ``lam`` gets a zero-rate step),
and ``lam`` is found by bisection on the total size. At high rate this gives
``s_j = sqrt(6 lam / (w_j ln 2))``: steps proportional to ``w_j^(-1/2)``, whatever the law.

Per-output-channel steps: a row ``r`` may take ``s_j 2^(o_r / 4)`` (``o_r`` in [-8, 7], coded
with a signed Exp-Golomb code of order 0 as side information), with its own GG scale (shared
gamma) and weight; a tensor keeps per-row steps only where they lower its Lagrangian cost.
With ``tensors=`` the real coded size (rANS under the fitted GG, :mod:`ggprior.codec.lengths`) is
measured at the chosen steps and each tensor's rate table rescaled to it, twice, so the target
is met by the real code lengths, not only by the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..gg import fit as gg_fit
from . import lengths as compression
from . import quantizer as quant
from .bits import CodingError
from .gg_rd import (  # noqa: F401  (re-exported: the tables' public names)
    GRID_LOG2,
    LN2,
    MAX_BINS,
    TABLE_LOG2,
    diff_entropy_bits,
    gg_rd,
    rd_table,
    shannon_lower_bound,
)
from .histogram import histogram

SIDE_BITS = compression.STEP_BITS + compression.RANGE_BITS + compression.ANS_OVERHEAD_BITS
DEFAULT_MIN_SQNR_DB = 10.0
"""The allocation's default SQNR floor per tensor: on MiniLM classifiers fine-tuned on sentiment and spam (2 seeds
each) at 2-3 bits/weight, decoded accuracy within 0.5 point of fp32 in 10 of 12 cases (6 dB: 9, none: 6, the rest
collapse to the majority class); SmolLM2 at 3-3.5 bits: perplexity unchanged (docs/results/sqnr_floor)."""
ROW_OFFSETS = np.arange(-8, 8)
ROW_OFFSET_BITS = (2 * np.floor(np.log2(np.where(ROW_OFFSETS > 0, 2 * ROW_OFFSETS, -2 * ROW_OFFSETS + 1))) + 1)
ROW_OFFSET_BITS = np.where(ROW_OFFSETS == 0, 1.0, ROW_OFFSET_BITS)  # EG0 of zigzag(o): 1, 3, 3, 5, ...


class AllocationError(ValueError):
    """A target size the model cannot meet, or bad allocation inputs."""


# ---------------------------------------------------------------- tensors


@dataclass
class TensorModel:
    """What the allocation needs of one tensor: size, fitted GG, weight, dtype bits, optional rows."""

    name: str
    n: int
    beta: float
    gamma: float
    weight: float = 1.0
    dtype_bits: int = 32
    row_beta: np.ndarray | None = None  # per-row GG scale (shared gamma), for per-row steps
    row_weight: np.ndarray | None = None  # per-row sensitivity (default: ``weight``)
    rate_scale: float = 1.0  # real coded size / model rate (set by the calibration)

    @property
    def rows(self) -> int:
        return 0 if self.row_beta is None else len(self.row_beta)


def tensor_model(name: str, t: torch.Tensor, weight: float = 1.0, *, row_weight=None, per_row: bool = False) -> TensorModel:
    """Fit the GG of a tensor (moment ratio) and, with ``per_row``, each row's scale at the shared gamma."""
    x = t.detach().float()
    f = gg_fit(x.reshape(-1), name=name)
    rb = None
    if per_row and x.dim() == 2 and x.shape[0] > 1:
        sd = x.to(torch.float64).std(dim=1, unbiased=False).numpy()
        rb = np.maximum(sd * math.sqrt(math.gamma(1 / f.gamma) / math.gamma(3 / f.gamma)), 1e-30)
    rw = None if row_weight is None else np.asarray(row_weight, dtype=np.float64)
    bits = torch.finfo(t.dtype).bits if t.is_floating_point() else 32
    return TensorModel(name, x.numel(), f.beta, f.gamma, float(weight), bits, rb, rw)


# ---------------------------------------------------------------- the allocation


@dataclass
class Allocation:
    """Chosen steps (float, or one per row) and the model's figures per tensor."""

    steps: dict[str, float | np.ndarray]
    target_bits: float
    bits: float  # model (calibrated) bits per weight, side information included
    rows: list[dict] = field(default_factory=list)
    lam: float = 0.0
    min_sqnr_db: float = 0.0  # the SQNR floor the steps keep

    def as_dict(self) -> dict:
        return {"target_bits": self.target_bits, "bits": self.bits, "lam": self.lam, "min_sqnr_db": self.min_sqnr_db,
                "tensors": self.rows}


@dataclass
class Pick:
    """One tensor's choice at a multiplier: Lagrangian cost, bits (calibrated), weighted SSE, step, row offsets."""

    cost: float
    bits: float
    dist: float
    step: float
    offsets: np.ndarray | None
    model_payload: float  # uncalibrated model payload bits
    side: float  # side information bits


def _choose(tm: TensorModel, lam: float, threshold: float, per_row: bool, min_sqnr_db: float = 0.0):
    """Best (cost, rate bits, weighted distortion, step, row offsets or None) of one tensor at ``lam``; steps whose
    SQNR would fall below ``min_sqnr_db`` are not taken, except by a tensor of weight 0 (one the calibration never
    reached, such as a pooler an embedding model does not use: it may still go to zero rate)."""
    H, logD = gg_rd(tm.gamma, threshold)
    s = tm.beta * np.exp2(GRID_LOG2)
    rate = tm.n * H * tm.rate_scale + SIDE_BITS
    dist = tm.weight * tm.n * tm.beta**2 * np.exp(logD)
    cost = dist + lam * rate
    if min_sqnr_db > 0 and tm.weight > 0:  # D / Var X of GG(0, 1, gamma): Var = Gamma(3/g) / Gamma(1/g)
        var = math.exp(math.lgamma(3 / tm.gamma) - math.lgamma(1 / tm.gamma))
        cost = np.where(logD - math.log(var) <= -min_sqnr_db * math.log(10) / 10, cost, np.inf)
    i = int(np.argmin(cost))
    best = Pick(float(cost[i]), float(rate[i]), float(dist[i]), float(s[i]), None, tm.n * float(H[i]), SIDE_BITS)
    if per_row and tm.rows:
        base = GRID_LOG2[i] + math.log2(tm.beta)
        m = tm.n // tm.rows
        rw = tm.row_weight if tm.row_weight is not None else np.full(tm.rows, tm.weight)
        # log2(row step / row beta) for every row x offset, on the table grid
        lg = base + ROW_OFFSETS[None, :] / 4.0 - np.log2(tm.row_beta)[:, None]
        Hr = np.interp(lg, GRID_LOG2, H)
        Dr = np.exp(np.interp(lg, GRID_LOG2, logD)) * tm.row_beta[:, None] ** 2
        rr = m * Hr * tm.rate_scale + ROW_OFFSET_BITS[None, :]
        dr = rw[:, None] * m * Dr
        cr = dr + lam * rr
        j = np.argmin(cr, axis=1)
        sel = np.arange(tm.rows)
        side_r = SIDE_BITS + float(ROW_OFFSET_BITS[j].sum())
        rate_r = float(rr[sel, j].sum()) + SIDE_BITS
        dist_r = float(dr[sel, j].sum())
        cost_r = dist_r + lam * rate_r
        if cost_r < best.cost:
            best = Pick(cost_r, rate_r, dist_r, float(s[i]), ROW_OFFSETS[j].astype(np.int64),
                        float((m * Hr[sel, j]).sum()), side_r)
    return best


def _solve(models: list[TensorModel], budget: float, threshold: float, per_row: bool, min_sqnr_db: float = 0.0):
    def total(lam):
        return sum(_choose(tm, lam, threshold, per_row, min_sqnr_db).bits for tm in models)

    lo, hi = -60.0, 60.0  # log2 lam
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if total(2.0**mid) > budget:
            lo = mid
        else:
            hi = mid
    lam = 2.0**hi
    return lam, [_choose(tm, lam, threshold, per_row, min_sqnr_db) for tm in models]


def _solve_floored(models: list[TensorModel], budget: float, threshold: float, per_row: bool,
                   min_sqnr_db: float | None):
    """``_solve`` under an SQNR floor: ``min_sqnr_db`` is a hard one (AllocationError where the budget cannot keep
    it); None is ``DEFAULT_MIN_SQNR_DB``, lowered (bisection) as far as a small budget needs. Returns (lam, picks,
    floor used)."""
    floor = DEFAULT_MIN_SQNR_DB if min_sqnr_db is None else float(min_sqnr_db)
    lam, picks = _solve(models, budget, threshold, per_row, floor)
    least = sum(pk.bits for pk in picks)
    if least <= budget * 1.001:
        return lam, picks, floor
    if min_sqnr_db is not None:
        n = sum(tm.n for tm in models)
        raise AllocationError(f"target of {budget / n:g} bits/weight is below the {least / n:.3f} bits/weight that "
                              f"keep every tensor at {floor:g} dB SQNR or more; lower min_sqnr_db or raise the target")
    lo, hi = 0.0, floor  # the floor at lo is met (0: no floor), at hi not
    best = _solve(models, budget, threshold, per_row, 0.0)
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        lam, picks = _solve(models, budget, threshold, per_row, mid)
        if sum(pk.bits for pk in picks) <= budget * 1.001:
            lo, best = mid, (lam, picks)
        else:
            hi = mid
    return best[0], best[1], lo


def check_target(models: Iterable[TensorModel], target_bits: float) -> None:
    """Raise AllocationError for a target below the side information or at/above the raw size."""
    models = list(models)
    n = sum(tm.n for tm in models)
    if not models or n == 0:
        raise AllocationError("bit allocation: no tensors to allocate")
    side = sum(SIDE_BITS for _ in models) / n
    raw = sum(tm.n * tm.dtype_bits for tm in models) / n
    if not math.isfinite(target_bits) or target_bits <= side:
        raise AllocationError(
            f"target of {target_bits} bits/weight is not above the side information ({side:.4f} bits/weight "
            f"for {len(models)} tensors)"
        )
    if target_bits >= raw:
        raise AllocationError(
            f"target of {target_bits} bits/weight is not below the raw size ({raw:g} bits/weight); store losslessly instead"
        )


def real_bits(t: torch.Tensor, step: float | np.ndarray, name: str = "tensor", threshold: float = 0.5) -> float:
    """Real coded size in bits of ``t`` at ``step`` (float, or one per row): rANS under the fitted GG + side info.

    Per-row steps: rows sharing an offset are coded as one stream (each with its own side
    information), plus the offsets' Exp-Golomb bits.
    """
    x = t.detach().float()
    if np.ndim(step) == 0:
        q = quantize(x, float(step), threshold, name)
        h = histogram(q.numpy())
        return float(compression.tensor_bits(h, ["ans"])["ans"]) + compression.STEP_BITS
    steps = np.asarray(step, dtype=np.float64)
    base = float(np.min(steps))
    offs = np.round(4 * np.log2(steps / base)).astype(np.int64)
    total = 0.0
    for o in np.unique(offs):
        rows = np.flatnonzero(offs == o)
        q = quantize(x[rows], float(steps[rows[0]]), threshold, name)
        total += float(compression.tensor_bits(histogram(q.numpy()), ["ans"])["ans"]) + compression.STEP_BITS
    zz = np.where(offs > 0, 2 * offs - 1, -2 * offs)  # offsets relative to the stored base
    return total + float((2 * np.floor(np.log2(zz + 1)) + 1).sum())


def quantize(t: torch.Tensor, step: float | np.ndarray, threshold: float = 0.5, name: str = "tensor") -> torch.Tensor:
    """Integers of ``t`` at ``step`` (per row if an array): rounding (``threshold`` 0.5) or a dead zone."""
    x = t.detach()
    if np.ndim(step) == 0:
        if threshold == 0.5:
            return quant.quantize(x, step, name=name)
        s = quant.check_step(step, name)
        if not bool(torch.isfinite(x).all()):
            raise quant.QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
        y = x.to(torch.float64).abs() / s
        return (torch.sign(x) * torch.clamp(torch.floor(y + 1.0 - threshold), min=0)).to(torch.int32)
    steps = np.asarray(step, dtype=np.float64)
    if steps.shape != (x.shape[0],) or not np.all(np.isfinite(steps) & (steps > 0)):
        raise quant.QuantError(f"{name}: per-row steps must be {x.shape[0]} finite numbers > 0")
    s = torch.from_numpy(steps.astype(np.float32).astype(np.float64)).reshape(-1, *([1] * (x.dim() - 1)))
    if not bool(torch.isfinite(x).all()):
        raise quant.QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
    y = x.to(torch.float64) / s
    q = torch.round(y) if threshold == 0.5 else torch.sign(y) * torch.clamp(torch.floor(y.abs() + 1.0 - threshold), min=0)
    if q.numel() and float(q.abs().max()) > quant.Q_LIMIT:
        raise quant.QuantError(f"{name}: a row step is too small for the row's range")
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, step: float | np.ndarray) -> torch.Tensor:
    """``q * step`` (per row if ``step`` is an array), float32."""
    if np.ndim(step) == 0:
        return quant.dequantize(q, step)
    s = torch.from_numpy(np.asarray(step, dtype=np.float32).astype(np.float64)).reshape(-1, *([1] * (q.dim() - 1)))
    return (q.to(torch.float64) * s).float()


def allocate(
    models: list[TensorModel],
    target_bits: float,
    *,
    threshold: float = 0.5,
    per_row: bool = False,
    tensors: Mapping[str, torch.Tensor] | None = None,
    calibrate: int = 2,
    min_sqnr_db: float | None = None,
) -> Allocation:
    """Steps minimising the weighted distortion at ``target_bits`` bits/weight (side information included).

    ``tensors`` (name -> tensor) turns on the calibration to real coded sizes (``calibrate``
    rounds). No tensor is given a step whose SQNR falls below ``min_sqnr_db`` (the sensitivity weights are a
    second-order model, wrong for a tensor quantized to near nothing); None: ``DEFAULT_MIN_SQNR_DB`` where the
    target allows, lower where it does not; 0: no floor. Raises :class:`AllocationError` for unreachable targets
    (a given ``min_sqnr_db`` included).
    """
    check_target(models, target_bits)
    n = sum(tm.n for tm in models)
    budget = target_bits * n
    lam, picks, floor = _solve_floored(models, budget, threshold, per_row, min_sqnr_db)
    for _ in range(calibrate if tensors is not None else 0):
        for tm, pk in zip(models, picks, strict=True):
            try:
                real_payload = real_bits(tensors[tm.name], _steps_of(tm, pk), tm.name, threshold) - pk.side
            except CodingError:  # a step too fine for the rANS alphabet: no calibration (target.py floors it)
                continue
            if pk.model_payload > 0 and real_payload > 0:
                tm.rate_scale = float(np.clip(real_payload / pk.model_payload, 0.25, 4.0))
        lam, picks, floor = _solve_floored(models, budget, threshold, per_row, min_sqnr_db)
    rows, steps = [], {}
    for tm, pk in zip(models, picks, strict=True):
        steps[tm.name] = _steps_of(tm, pk)
        mse = pk.dist / (tm.weight * tm.n) if tm.weight > 0 else float("nan")
        slb = shannon_lower_bound(tm.beta, tm.gamma, mse) if pk.offsets is None and mse > 0 else float("nan")
        model_rate = pk.model_payload / tm.n
        rows.append({
            "name": tm.name, "n": tm.n, "beta": tm.beta, "gamma": tm.gamma, "weight": tm.weight,
            "step": pk.step, "per_row": pk.offsets is not None, "bits": pk.bits / tm.n,
            "model_payload_bits": model_rate, "mse_model": mse, "slb_bits": slb,
            "gap_to_slb_bits": model_rate - slb if slb == slb else float("nan"), "rate_scale": tm.rate_scale,
        })
    return Allocation(steps, target_bits, sum(pk.bits for pk in picks) / n, rows, lam, floor)


def _steps_of(tm: TensorModel, pk: Pick) -> float | np.ndarray:
    if pk.offsets is None:
        return pk.step
    return pk.step * np.exp2(pk.offsets / 4.0)


def uniform_rd(models: list[TensorModel], step: float, threshold: float = 0.5) -> tuple[float, float]:
    """(model bits/weight, weighted distortion) when every tensor uses ``step``."""
    n = sum(tm.n for tm in models)
    bits = dist = 0.0
    for tm in models:
        H, logD = gg_rd(tm.gamma, threshold)
        lg = math.log2(step / tm.beta)
        bits += tm.n * float(np.interp(lg, GRID_LOG2, H)) * tm.rate_scale + SIDE_BITS
        dist += tm.weight * tm.n * tm.beta**2 * math.exp(float(np.interp(lg, GRID_LOG2, logD)))
    return bits / n, dist
