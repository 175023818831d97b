"""DeepShape (paper Algorithm 1): reshape trained weights toward a target generalized Gaussian.

For one group of values (a tensor, or every selected tensor pooled):

1. Histogram on a grid anchored at 0 with bin width ``w`` (2^-13): value x falls in bin
   ``j = round(x / w)``, which covers ``[(j - 1/2) w, (j + 1/2) w)``.
2. Trim the low-count tails: the leading and trailing runs of bins holding fewer than
   ``n_min`` values. ``n_min`` is an absolute count when an int (the reference code used
   1000, on bins of width ``w``) and a fraction of the fullest bin's count when a float in
   (0, 1] (default 1e-3), but never below 2. For a fraction the cut is taken on bins merged
   by powers of two until the fullest holds at least 2 / n_min values (at most down to 32
   bins over the range), so the threshold is a true density ratio f(x)/f(mode) even where
   the fine histogram is sparse: a 6k-value tensor holds about a dozen values per 2^-13 bin,
   and a run of single-value bins would otherwise cut it inside 2 beta. The cut then falls
   near 5 beta for gamma = 1.2 and 3.7 sigma for a Gaussian, for any tensor size. A fixed
   count cuts a 1M and a 1B tensor at very different places (SPEC.md section 5).
3. Fit GG(mu, beta, gamma) by moment ratio on the core (the values in the kept bins).
   The target must span at least ``MIN_BETA_BINS`` = 4 bins per beta (below that the
   binned target misses its own shape by more than 1%); otherwise a ValueError.
4. Target GG(mu, K_gamma gamma, K_beta beta). Each target bin gets probability
   cdf(upper edge) - cdf(lower edge), renormalised over the target bins, and an exact
   integer count (``rounding``: cumulative rounding by default, or largest remainder), so
   every core value is assigned.
5. Remap, keeping rank order: the core values, sorted, fill the target bins in order with
   exactly those counts. Inside a bin the values are spread evenly by rank over the central
   half of the bin, so order is kept strictly and a value never sits within a quarter bin of
   an edge, which keeps the counts exact after rounding to float32. ``snap=True`` puts every
   output value (tails included) on the bin centres, i.e. on the grid ``w * Z``.

The tails (``tails=``):

* ``"scale"`` (default): the target bins span the target's quantiles of the tail fractions,
  so the tails keep their share of the values. A tail value at distance d beyond the old
  core edge goes to distance r d beyond the new edge, r = target quantile / fitted quantile
  (about mu) at the cut: r = K_beta exactly when K_gamma = 1. Outliers keep their place
  relative to the core and rank order is kept. The core lands on the target (it is the
  target truncated at its tail quantiles, which biases its fitted gamma up by 1-2%). The
  whole-tensor fit follows the target on GG-like tensors (within about 1% on synthetic
  data), but on tensors with heavy outliers (MiniLM's FFN output matrices: whole-tensor
  gamma 1.35 against 1.65 for the core) the moment fit is outlier-dominated and stays up to
  16% below the core-based target.
* ``"keep"``: the reference behaviour. The target is truncated to the original core range
  and the tail values stay where they are. With K_beta < 1 the untouched tails then sit
  further out relative to the new scale, and the whole-tensor fitted gamma falls.
* ``"reshape"``: the fit still uses the trimmed core, but every value is remapped (the
  tails too), so the result is a discretised sample of the target and outliers are lost.

This module holds the sort-based implementation, :func:`reshape_values_reference` (runs on the
tensors' device; two sorts plus vectorised arithmetic): the oracle that the library's
:func:`ggprior.deepshape.reshape_values` (:func:`ggprior.deepshape.remap.reshape_values_fast`,
bucket sort and a fused numba remap, bit for bit the same output) is tested and benchmarked
against. Whole models (selection, pooling, the finer-grid fallback): :mod:`ggprior.deepshape.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import gg

BIN_WIDTH = 2.0**-13
N_MIN = 1e-3
TAILS = ("scale", "keep", "reshape")
SELECT = ("matrices", "linear", "all")
MIN_NUMEL = 4096
MIN_BETA_BINS = 4
MAX_BINS = 1 << 24
"""Most bins one remap may span (a float64 edge per bin: 128 MiB); a finer grid is refused, not allocated."""


@dataclass
class ShapeReport:
    """What DeepShape did to one group of values (a tensor, or the pooled selection)."""

    name: str
    numel: int
    n_core: int
    n_low: int
    n_high: int
    n_min: int
    cut_width: float
    cut: tuple[float, float]
    new_cut: tuple[float, float]
    core_fit: gg.GGFit
    target: tuple[float, float, float]
    before: gg.GGFit
    after: gg.GGFit
    after_core: gg.GGFit
    entropy_before: float
    entropy_after: float
    rel_change: float
    members: list[str] = field(default_factory=list)
    bin_width: float = BIN_WIDTH

    def to_row(self) -> dict:
        """A flat dict for :func:`ggprior.io.write_table`."""
        mu, beta, gamma = self.target
        return {
            "name": self.name, "numel": self.numel, "n_core": self.n_core,
            "tail_frac": (self.n_low + self.n_high) / self.numel, "n_min": self.n_min, "cut_width": self.cut_width,
            "cut_low": self.cut[0], "cut_high": self.cut[1],
            "gamma_core": self.core_fit.gamma, "beta_core": self.core_fit.beta,
            "gamma_target": gamma, "beta_target": beta,
            "gamma_before": self.before.gamma, "beta_before": self.before.beta,
            "gamma_after": self.after.gamma, "beta_after": self.after.beta,
            "gamma_after_core": self.after_core.gamma, "beta_after_core": self.after_core.beta,
            "entropy_before": self.entropy_before, "entropy_after": self.entropy_after,
            "rel_change": self.rel_change,
        }


def _check_probs(probs: torch.Tensor, total: int, who: str) -> torch.Tensor:
    p = probs.detach().to(torch.float64).reshape(-1)
    if total < 0:
        raise ValueError(f"{who}: total must be >= 0, got {total}")
    if p.numel() == 0 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f"{who}: probabilities must be finite, >= 0 and not all zero")
    return p


def largest_remainder(probs: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts summing exactly to ``total``, proportional to ``probs`` (Hamilton's method).

    Each entry gets floor(total * p); the values left over go one each to the entries with
    the largest fractional parts (ties to the lower index). ``probs`` must be finite, >= 0,
    with a positive sum; it is renormalised.
    """
    p = _check_probs(probs, total, "largest_remainder")
    share = p / p.sum() * total
    counts = torch.floor(share).to(torch.int64)
    left = total - int(counts.sum())
    if left > 0:
        frac = share - counts.to(torch.float64)
        order = torch.sort(-frac, stable=True).indices[:left]
        counts[order] += 1
    return counts


def cumulative_counts(probs: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts summing exactly to ``total`` by rounding the cumulative distribution.

    count_j = round(total * P_j) - round(total * P_{j-1}), P the running sum of the
    renormalised ``probs``: every count is within 1 of its share and, unlike
    :func:`largest_remainder`, the running total never drifts more than 1/2 from
    ``total * P``, so sparse tails (many bins with shares below 1/2) keep their mass.
    """
    p = _check_probs(probs, total, "cumulative_counts")
    cum = torch.round(torch.cumsum(p / p.sum(), 0) * total).to(torch.int64)
    cum[-1] = total
    return torch.diff(cum, prepend=cum.new_zeros(1))


def grid_entropy(values: torch.Tensor, step: float = BIN_WIDTH) -> float:
    """Empirical entropy in bits per value of ``round(values / step)`` (a lower bound on any code)."""
    x = values.detach().reshape(-1)
    if x.numel() == 0:
        raise ValueError("grid_entropy: empty input")
    lev = torch.round(x.to(_work_dtype(x)) / step).to(torch.int64)
    return _entropy(torch.unique(lev, return_counts=True)[1])


def _entropy(counts: torch.Tensor) -> float:
    """Entropy in bits of the law given by the non-zero ``counts``."""
    p = counts.to(torch.float64) / counts.sum()
    return float(-(p * torch.log2(p)).sum())


ROUNDINGS = {"cumulative": cumulative_counts, "largest_remainder": largest_remainder}


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _resolve_n_min(n_min: int | float, peak: int, name: str) -> int:
    if isinstance(n_min, bool) or not isinstance(n_min, int | float):
        raise ValueError(f"{name}: n_min must be an int count or a float fraction, got {n_min!r}")
    if isinstance(n_min, float):
        if not 0.0 < n_min <= 1.0:
            raise ValueError(f"{name}: a fractional n_min must lie in (0, 1], got {n_min}")
        count = max(2, math.ceil(n_min * peak))
    elif n_min < 1:
        raise ValueError(f"{name}: n_min must be >= 1, got {n_min}")
    else:
        count = n_min
    if count > peak:
        raise ValueError(f"{name}: no bin holds n_min={count} values (the fullest holds {peak}); too sparse for "
                         "this bin width")
    return count


def _check_args(k_gamma: float, k_beta: float, bin_width: float, tails: str, rounding: str) -> None:
    for label, v in (("k_gamma", k_gamma), ("k_beta", k_beta), ("bin_width", bin_width)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{label} must be a finite number > 0, got {v!r}")
    if tails not in TAILS:
        raise ValueError(f"tails must be one of {', '.join(TAILS)}, got {tails!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def _core(cnt: torch.Tensor, n_min: int) -> tuple[int, int]:
    """Indices (into the non-empty bins) of the first and last bin holding >= n_min values."""
    ok = torch.nonzero(cnt >= n_min).reshape(-1)
    return int(ok[0]), int(ok[-1])


class _Target(NamedTuple):
    mu: float
    gamma_t: float
    beta_t: float
    r0: int
    r1: int
    ra: int
    rb: int
    a2: int
    lo_edge: float
    hi_edge: float
    counts: torch.Tensor
    tail_scale: tuple[float, float] | None  # tails="scale": the factors of the low and high tail


def _target(core_fit, k_gamma: float, k_beta: float, w: float, n: int, core: tuple[int, int, int, int],
            ends: tuple[int, int], tails: str, rounding: str, name: str) -> _Target:
    """The target GG of a group and the exact count of each target bin (shared by both reshape paths).

    ``core`` is ``_trim``'s (start, end, a, b); ``ends`` the lowest and highest grid level of all values.
    """
    mu = core_fit.mu
    gamma_t, beta_t = k_gamma * core_fit.gamma, k_beta * core_fit.beta
    if not gg.GAMMA_MIN <= gamma_t <= gg.GAMMA_MAX:
        raise ValueError(
            f"{name}: target gamma {gamma_t:.4g} = {k_gamma} x {core_fit.gamma:.4g} lies outside "
            f"[{gg.GAMMA_MIN}, {gg.GAMMA_MAX}]"
        )

    if beta_t < MIN_BETA_BINS * w:
        raise ValueError(
            f"{name}: target beta {beta_t:.4g} is too narrow for bin width {w:.4g} (needs >= {MIN_BETA_BINS} bins "
            "per beta to hit the target shape); use a smaller bin width"
        )
    # the remapped range: the core, or everything when the tails are reshaped too
    r0, r1, ra, rb = (0, n, *ends) if tails == "reshape" else core
    if tails == "keep":
        a2, b2 = core[2:]
    else:
        q = torch.tensor([max(r0, 0.5) / n, 1.0 - max(n - r1, 0.5) / n], dtype=torch.float64)
        lo_t, hi_t = (float(t) for t in gg.ppf(q, mu, beta_t, gamma_t))
        if not (abs(lo_t) + abs(hi_t)) / w < MAX_BINS:
            raise ValueError(f"{name}: the target range [{lo_t:.4g}, {hi_t:.4g}] needs more than {MAX_BINS:,} bins "
                             f"of width {w:.4g}; use a larger bin width")
        a2, b2 = round(lo_t / w + 0.5), round(hi_t / w + 0.5) - 1
    lo_edge, hi_edge = (a2 - 0.5) * w, (b2 + 0.5) * w
    if b2 - a2 >= MAX_BINS:
        raise ValueError(f"{name}: the remapped range needs {b2 - a2 + 1:,} bins of width {w:.4g} "
                         f"(at most {MAX_BINS:,}); use a larger bin width")
    if b2 < a2 or not lo_edge < mu < hi_edge:
        raise ValueError(
            f"{name}: target beta {beta_t:.4g} is too narrow for bin width {w:.4g}; use a smaller bin width"
        )
    edges = (torch.arange(a2, b2 + 2, dtype=torch.float64) - 0.5) * w
    probs = torch.diff(gg.cdf(edges, mu, beta_t, gamma_t))
    if float(probs.sum()) <= 0.0:
        raise ValueError(f"{name}: the target puts no mass on bins {a2}..{b2}; check k_gamma/k_beta")
    counts = ROUNDINGS[rounding](probs, r1 - r0)
    tail_scale = None
    if tails == "scale":
        lo_f, hi_f = (float(t) - mu for t in gg.ppf(q, mu, core_fit.beta, core_fit.gamma))
        tail_scale = ((lo_t - mu) / lo_f, (hi_t - mu) / hi_f)
    return _Target(mu, gamma_t, beta_t, r0, r1, ra, rb, a2, lo_edge, hi_edge, counts, tail_scale)


def _trim(levels: torch.Tensor, counts: torch.Tensor, n_min: int | float, w: float,
          name: str) -> tuple[int, int, int, int, int, float]:
    """The core of sorted values whose non-empty grid levels are ``levels`` (ascending) with ``counts``.

    Returns (start, end, a, b, n_min, cut width): the core is the slice [start, end) of the sorted
    values, its levels run from a to b. An int ``n_min`` counts values per bin of width ``w`` (the
    reference rule). A fraction is applied on bins merged by powers of two until the fullest holds
    >= 2 / fraction values (or the bins reach 1/32 of the range), so the threshold is a real
    density ratio even when the fine histogram is sparse (a small tensor holds a handful of
    values per 2^-13 bin).
    """
    ccnt = counts
    m = 1
    if isinstance(n_min, float) and 0.0 < n_min <= 1.0:  # merge first; the threshold is checked on merged bins
        span = int(levels[-1] - levels[0]) + 1
        while int(ccnt.max()) * n_min < 2 and 64 * m <= span:
            m *= 2
            group = torch.unique_consecutive(torch.div(levels, m, rounding_mode="floor"), return_inverse=True)[1]
            ccnt = torch.zeros(int(group[-1]) + 1, dtype=counts.dtype).index_add_(0, group, counts)
    nmin = _resolve_n_min(n_min, int(ccnt.max()), name)
    first, last = _core(ccnt, nmin)
    csum = torch.cumsum(ccnt, 0)
    start, end = (int(csum[first - 1]) if first > 0 else 0), int(csum[last])
    fine = torch.cumsum(counts, 0)  # the fine levels of the core's first and last values
    a = int(levels[int(torch.searchsorted(fine, start, right=True))])
    b = int(levels[int(torch.searchsorted(fine, end))])
    return start, end, a, b, nmin, m * w


def _fill(counts: torch.Tensor, first_bin: int, w: float, snap: bool) -> torch.Tensor:
    """Sorted new values (float64): counts[i] values in bin first_bin + i, spread by rank.

    The k-th value overall, the r-th of its bin's c, lands at the bin's left edge plus
    w (1/4 + (r + 1/2) / (2c)), written as base[bin] + step[bin] * k so that only two
    repeat_interleave passes touch every value.
    """
    dev = counts.device
    total = int(counts.sum())
    left = (torch.arange(counts.numel(), device=dev, dtype=torch.float64) + (first_bin - 0.5)) * w
    if snap:
        return torch.repeat_interleave(left + 0.5 * w, counts, output_size=total)
    # a true division (a Python number / tensor is reciprocal-then-multiply in torch, one more rounding)
    step = torch.div(torch.full((counts.numel(),), 0.5 * w, device=dev, dtype=torch.float64),
                     counts.clamp(min=1).to(torch.float64))
    first_rank = (torch.cumsum(counts, 0) - counts).to(torch.float64)
    base = left + 0.25 * w + step * (0.5 - first_rank)
    k = torch.arange(total, device=dev, dtype=torch.float64)
    return torch.repeat_interleave(base, counts, output_size=total) + torch.repeat_interleave(
        step, counts, output_size=total
    ) * k


def reshape_values_reference(
    x: torch.Tensor,
    k_gamma: float,
    k_beta: float,
    *,
    bin_width: float = BIN_WIDTH,
    n_min: int | float = N_MIN,
    tails: str = "scale",
    snap: bool = False,
    rounding: str = "cumulative",
    name: str = "tensor",
) -> tuple[torch.Tensor, ShapeReport]:
    """Reshape the values of ``x`` toward GG(mu, k_gamma * gamma, k_beta * beta) (Algorithm 1).

    The reference implementation (``torch.sort``, two-pass :func:`ggprior.gg.fit`), kept as the
    tests' oracle; the library calls :func:`ggprior.deepshape.reshape_values`, the same output.
    Returns a new tensor of ``x``'s shape, dtype and device, and a :class:`ShapeReport`.
    ``rounding`` turns target probabilities into counts: ``"cumulative"`` (default, see
    :func:`cumulative_counts`) or ``"largest_remainder"``.
    Raises ValueError naming ``name`` for bad arguments, NaN/Inf, constant or too-few values,
    or a target narrower than the bins (lower ``bin_width``).
    """
    _check_args(k_gamma, k_beta, bin_width, tails, rounding)
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n < 2:
        raise ValueError(f"{name}: needs at least 2 values, got {n}")
    v = flat.to(_work_dtype(flat))
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: contains NaN or Inf values; cannot reshape")
    w = float(bin_width)

    sv, order = torch.sort(v, stable=True)
    ulev, ucnt = torch.unique_consecutive(torch.round(sv / w).to(torch.int64), return_counts=True)
    start, end, a, b, nmin, cut_width = _trim(ulev, ucnt, n_min, w, name)
    core_fit = gg.fit(sv[start:end], name=name)
    t = _target(core_fit, k_gamma, k_beta, w, n, (start, end, a, b), (int(ulev[0]), int(ulev[-1])), tails,
                rounding, name)
    mu, gamma_t, beta_t, r0, r1, ra, rb, a2, lo_edge, hi_edge, counts, tail_scale = t
    counts = counts.to(sv.device)
    low, high = sv[:r0].to(torch.float64), sv[r1:].to(torch.float64)
    if tail_scale is not None:
        low = lo_edge + (low - (ra - 0.5) * w) * tail_scale[0]
        high = hi_edge + (high - (rb + 0.5) * w) * tail_scale[1]
    if snap:
        low, high = torch.round(low / w) * w, torch.round(high / w) * w
    out_sorted = torch.cat([low, _fill(counts, a2, w, snap), high]).to(flat.dtype)

    out = torch.empty_like(flat)
    out[order] = out_sorted
    work = out_sorted.to(v.dtype)  # sorted too: the map is monotone
    trimmed = start > 0 or end < n
    after = gg.fit(work, name=name)
    norm = float(torch.linalg.vector_norm(sv, dtype=torch.float64))
    report = ShapeReport(
        name=name, numel=n, n_core=end - start, n_low=start, n_high=n - end, n_min=nmin, cut_width=cut_width,
        cut=((a - 0.5) * w, (b + 0.5) * w), new_cut=(lo_edge, hi_edge), core_fit=core_fit,
        target=(mu, beta_t, gamma_t), before=gg.fit(sv, name=name) if trimmed else core_fit, after=after,
        after_core=gg.fit(work[start:end], name=name) if trimmed else after,
        entropy_before=_entropy(ucnt),
        entropy_after=_entropy(torch.unique_consecutive(torch.round(work / w).to(torch.int64), return_counts=True)[1]),
        rel_change=float(torch.linalg.vector_norm(work - sv, dtype=torch.float64)) / norm if norm > 0 else 0.0,
        bin_width=w,
    )
    return out.reshape(x.shape), report
