"""BackSlash: rate-constrained training with a generalized-Gaussian rate (arXiv 2504.16968).

Objective J = D + lambda R(theta), with the GG rate surrogate over the N penalised values

    R(theta) = (1/N) sum_i (|theta_i| + eps)^nu,

nu the GG shape of the parameters re-estimated every step by the moment ratio
rho_hat = N sum(theta^2) / (sum|theta|)^2, nu = rho^-1(rho_hat), read from a table of
``ggprior.gg.rho`` over 4097 log-spaced shapes in ``nu_range`` = [0.1, 3.0] (the reference uses
a table over [0.10, 2.99] step 0.01) with linear interpolation: relative error below 1e-5, and
~1000x faster than bisection, which matters when it runs every step. Ratios beyond the table
are clamped to its ends. The ratio is not centred (the rate is on |theta|), as in the reference.

Two ways to apply it (``mode``):

- ``"step"`` (default, the reference implementation): after every optimizer step, outside
  autograd, theta <- theta - (lambda nu / N) sign(theta) (|theta| + eps)^(nu - 1), i.e. a plain
  gradient step on lambda R with unit rate. Its strength does not depend on the optimizer.
- ``"loss"``: lambda R(theta) is added to the loss and differentiated; the same gradient then
  passes through AdamW's per-coordinate normalisation, so lambda means something else.

Decisions (OPEN in the notes):

- Which parameters: ``params="matrices"`` (default) penalises every tensor with >= 2 dims
  (linear/attention/MLP matrices, embeddings; tied ones once) and pools nu over them; LayerNorm
  gains (near 1) and biases would otherwise dominate the pooled moment ratio (SPEC.md section 1
  measures gamma ~ 0.08 pooled over all of MiniLM against 1.24 over its matrices) and be
  shrunk towards 0. ``params="all"`` reproduces the reference (every parameter).
- ``per_tensor=True`` estimates one nu per tensor; N stays the total count, so R is still
  one mean over all penalised values.
- Fixed-shape baselines: ``nu=1`` is L1 (the update is (lambda/N) sign(theta), eps is
  irrelevant); ``nu=2, eps=0`` is exactly decoupled weight decay theta <- (1 - 2 lambda/N) theta.
  ``make_rate_callback`` builds these as ``l1`` / ``l2``.
- eps must be positive whenever nu can fall below 1 (the update (|theta|+eps)^(nu-1) is
  infinite at 0 otherwise); default 1, the reference value.
- Schedule: ``epochs=k`` applies the rate in the first k epochs only (BackSlash epochs, then
  plain fine-tuning epochs); ``None`` applies it throughout.
- lambda is per-model: the step is lambda nu / N per value, so the same lambda is ~100x
  stronger on a 1M-parameter model than on BERT-base (110M; reference lambda = 2e3).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..gg.math import rho
from .loop import Callback, TrainError

NU_RANGE = (0.1, 3.0)
PARAM_SETS = ("matrices", "all")
MODES = ("step", "loss")
RATES = ("none", "backslash", "l1", "l2")


def rate_parameters(model: nn.Module, which: str = "matrices") -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs the rate applies to; tied parameters once."""
    if which not in PARAM_SETS:
        raise TrainError(f"unknown parameter set {which!r}; known: {', '.join(PARAM_SETS)}")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (which == "all" or p.dim() >= 2)]


@functools.lru_cache(maxsize=8)
def _rho_table(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    nu = np.geomspace(lo, hi, 4097)
    return np.asarray(rho(nu), dtype=np.float64)[::-1].copy(), nu[::-1].copy()  # rho increasing


def nu_from_ratio(ratio: np.ndarray, nu_range: tuple[float, float] = NU_RANGE) -> np.ndarray:
    """Invert the moment ratio rho(nu) by table lookup, clamped to ``nu_range``."""
    rhos, nus = _rho_table(float(nu_range[0]), float(nu_range[1]))
    return np.interp(np.asarray(ratio, dtype=np.float64), rhos, nus)


def moment_sums(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-tensor (count, sum |x|, sum x^2) in float64, shape (len(tensors), 3), one device sync."""
    if not tensors:
        raise TrainError("no tensors to estimate a GG shape from")
    with torch.no_grad():
        l1 = torch.stack([torch.linalg.vector_norm(t.detach(), 1, dtype=torch.float64) for t in tensors])
        l2 = torch.stack([torch.linalg.vector_norm(t.detach(), 2, dtype=torch.float64) for t in tensors])
        sums = torch.stack([l1, l2.square()], dim=1).cpu().numpy()
    counts = np.array([[t.numel()] for t in tensors], dtype=np.float64)
    return np.concatenate([counts, sums], axis=1)


def estimate_nu(tensors: Sequence[torch.Tensor], per_tensor: bool = False,
                nu_range: tuple[float, float] = NU_RANGE) -> np.ndarray:
    """The GG shape by the moment ratio N sum(x^2) / (sum|x|)^2: pooled, or one per tensor.

    Returns one nu per tensor (all equal when pooled). An all-zero pool or tensor gets the
    upper bound of ``nu_range`` (no rate pressure left to exert).
    """
    m = moment_sums(tensors)
    if not per_tensor:
        m = m.sum(axis=0, keepdims=True)
    n, s1, s2 = m[:, 0], m[:, 1], m[:, 2]
    ratio = np.divide(n * s2, s1**2, out=np.zeros_like(s1), where=s1 > 0)
    nu = nu_from_ratio(ratio, nu_range)
    return np.broadcast_to(nu, (len(tensors),)).copy()


def rate(tensors: Sequence[torch.Tensor], nu: Sequence[float] | float, eps: float = 1.0) -> torch.Tensor:
    """R = (1/N) sum (|x| + eps)^nu over all values (differentiable; nu per tensor or shared)."""
    nus = [float(nu)] * len(tensors) if np.isscalar(nu) else [float(v) for v in nu]
    if len(nus) != len(tensors):
        raise TrainError(f"got {len(nus)} shapes for {len(tensors)} tensors")
    n = sum(t.numel() for t in tensors)
    return sum((t.abs() + eps).pow(v).sum() for t, v in zip(tensors, nus, strict=True)) / n


@functools.lru_cache(maxsize=16)
def _rho_table_tensor(lo: float, hi: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rhos, nus = _rho_table(lo, hi)
    return torch.from_numpy(rhos).to(device), torch.from_numpy(nus).to(device)


def nu_from_ratio_tensor(ratio: torch.Tensor, nu_range: tuple[float, float] = NU_RANGE) -> torch.Tensor:
    """:func:`nu_from_ratio` on the ratio's device (float64; no host round trip): the same table, linear
    interpolation, clamped to ``nu_range``; a ratio that is not finite or not positive gets the upper bound."""
    rhos, nus = _rho_table_tensor(float(nu_range[0]), float(nu_range[1]), ratio.device)
    r = ratio.to(torch.float64)
    i = torch.searchsorted(rhos, r).clamp_(1, rhos.numel() - 1)
    lo, hi = rhos[i - 1], rhos[i]
    w = ((r - lo) / (hi - lo)).clamp_(0.0, 1.0)
    nu = nus[i - 1] + w * (nus[i] - nus[i - 1])
    return torch.where(torch.isfinite(r) & (r > 0), nu, torch.full_like(nu, float(nu_range[1])))


def _update_(t: torch.Tensor, a: torch.Tensor, lam: float, nu: torch.Tensor | float, eps: float, n: int) -> None:
    """t <- t - (lam nu / n) sign(t) (a + eps)^(nu - 1), a = |t| (overwritten); c folded into the exponent."""
    c = lam * nu / n
    if eps == 1.0:
        a.log1p_()
    else:
        a.add_(eps).log_()
    a.mul_(nu - 1.0).add_(torch.log(c) if isinstance(c, torch.Tensor) else np.log(c)).exp_()
    t.addcmul_(a, t.sign(), value=-1.0)  # sign(0) = 0: zeros stay zero


@torch.no_grad()
def backslash_step_(tensors: Sequence[torch.Tensor], lam: float, nu: Sequence[float] | float | None = None,
                    eps: float = 1.0, n: int | None = None, *, per_tensor: bool = False,
                    nu_range: tuple[float, float] = NU_RANGE, sums_out: list | None = None) -> torch.Tensor:
    """In place: x <- x - (lam nu / N) sign(x) (|x| + eps)^(nu - 1); N defaults to the total count.

    ``nu=None`` (BackSlash) estimates the shape in the same pass: the |x| the update needs gives
    sum|x| and sum x^2 (float64), the moment ratio gives nu (pooled, or per tensor) on the
    tensors' device by table interpolation (:func:`nu_from_ratio_tensor`), and the update uses it;
    nothing waits for the device. Returns the nu used per tensor (a float64 tensor on the device).
    The power is exp((nu - 1) log(|x| + eps) + log(lam nu / N)): about 2x faster than ``pow`` on CPU.
    Zeros stay zero (sign 0); lam = 0 changes nothing. With ``nu=None``, ``sums_out`` (a list)
    receives the per-tensor sum |x| before the update (float64, on the device).
    """
    if not tensors:
        raise TrainError("no tensors to apply the rate step to")
    n = n if n is not None else sum(t.numel() for t in tensors)
    dev = tensors[0].device
    if nu is None:
        absd = [t.abs() for t in tensors]
        s1 = torch.stack([a.sum(dtype=torch.float64) for a in absd])
        s2 = torch.stack([torch.linalg.vector_norm(t, 2, dtype=torch.float64) for t in tensors]).square()
        if sums_out is not None:
            sums_out.append(s1)
        counts = torch.tensor([float(t.numel()) for t in tensors], dtype=torch.float64, device=dev)
        if not per_tensor:
            counts, s1, s2 = counts.sum(0, keepdim=True), s1.sum(0, keepdim=True), s2.sum(0, keepdim=True)
        nus = nu_from_ratio_tensor(counts * s2 / s1.square(), nu_range).expand(len(tensors))
        if lam > 0:
            for t, a, v in zip(tensors, absd, nus.to(tensors[0].dtype if tensors[0].is_floating_point() else
                                                      torch.float32).unbind(0), strict=True):
                _update_(t, a, lam, v, eps, n)
        return nus
    nus_f = [float(nu)] * len(tensors) if np.isscalar(nu) else [float(v) for v in nu]
    if len(nus_f) != len(tensors):
        raise TrainError(f"got {len(nus_f)} shapes for {len(tensors)} tensors")
    for t, v in zip(tensors, nus_f, strict=True):
        c = lam * v / n
        if c == 0:
            continue
        if v == 1.0:
            t.sub_(torch.sign(t), alpha=c)
        elif v == 2.0 and eps == 0.0:
            t.mul_(1.0 - 2.0 * lam / n)
        else:
            _update_(t, t.abs(), lam, v, eps, n)
    return torch.tensor(nus_f, dtype=torch.float64, device=dev)


def backslash_step_reference_(tensors: Sequence[torch.Tensor], lam: float, nu: Sequence[float] | float,
                              eps: float = 1.0, n: int | None = None) -> None:
    """The plain, unfused update (the oracle the tests hold :func:`backslash_step_` to)."""
    nus = [float(nu)] * len(tensors) if np.isscalar(nu) else [float(v) for v in nu]
    n = n if n is not None else sum(t.numel() for t in tensors)
    with torch.no_grad():
        for t, v in zip(tensors, nus, strict=True):
            t.sub_(lam * v / n * torch.sign(t) * (t.abs() + eps).pow(v - 1.0))


# --- Proximal (soft-threshold) variant of the step, and the reference lambda --------------------
#
# ``backslash_step_`` is a subgradient step: a value smaller than the step size c crosses zero
# and flips sign, so the rate only makes values oscillate around 0 (|x| <= c), never exactly 0.
# The proximal variant applies the same shrinkage but stops at zero (soft-thresholding, the
# proximal operator of the linearised rate c (|x| + eps)^(nu - 1) |x| at the current x):
#
#     x <- sign(x) max(|x| - c (|x| + eps)^(nu - 1), 0),   c = lambda nu / N,
#
# which gives exact zeros (for nu = 1 it is the proximal step of L1, the ISTA update). A value
# at 0 stays there unless the optimizer's next step moves it by more than the threshold.
#
# Reference lambda: the authors' code uses lambda = 2e3 with the step lambda nu / N over every
# parameter of the model (BERT-base, N ~ 110M). ``reference_lambda(n, multiple)`` gives
# ``multiple`` x 2e3 as is (the reference scaling: per-value step 2e3 nu / N on this model),
# or with ``match_size=True`` rescaled by N / 110M, so the per-value step equals the one the
# reference took on BERT-base.

UPDATES = ("subgradient", "proximal")
REFERENCE_LAMBDA = 2e3
REFERENCE_N = 110e6


def reference_lambda(n: int, multiple: float = 1.0, *, match_size: bool = False) -> float:
    """``multiple`` x the reference lambda 2e3; ``match_size`` rescales it by n / 110M (BERT-base)."""
    return float(multiple) * REFERENCE_LAMBDA * (n / REFERENCE_N if match_size else 1.0)


@torch.no_grad()
def backslash_prox_(tensors: Sequence[torch.Tensor], lam: float, nu: Sequence[float] | float, eps: float = 1.0,
                    n: int | None = None) -> None:
    """In place: x <- sign(x) max(|x| - (lam nu / N) (|x| + eps)^(nu - 1), 0) (exact zeros)."""
    nus = [float(nu)] * len(tensors) if np.isscalar(nu) else [float(v) for v in nu]
    n = n if n is not None else sum(t.numel() for t in tensors)
    for t, v in zip(tensors, nus, strict=True):
        c = lam * v / n
        a = t.abs()
        thr = a.add(eps).log_().mul_(v - 1.0).exp_().mul_(c) if v != 1.0 else c
        t.copy_(a.sub_(thr).clamp_(min=0.0).mul_(t.sign()))


class BackSlash(Callback):
    """Rate-constrained training as a trainer callback (see the module docstring).

    ``nu=None`` re-estimates the shape every step (BackSlash); a number fixes it (L1: 1, L2: 2).
    """

    def __init__(self, lam: float, *, nu: float | None = None, eps: float = 1.0, per_tensor: bool = False,
                 mode: str = "step", epochs: int | None = None, params: str = "matrices",
                 nu_range: tuple[float, float] = NU_RANGE, update: str = "subgradient"):
        if update not in UPDATES:
            raise TrainError(f"unknown BackSlash update {update!r}; known: {', '.join(UPDATES)}")
        if update == "proximal" and mode != "step":
            raise TrainError("the proximal BackSlash update needs mode='step'")
        self.update = update
        if not lam >= 0:
            raise TrainError(f"BackSlash lambda must be >= 0, got {lam}")
        if mode not in MODES:
            raise TrainError(f"unknown BackSlash mode {mode!r}; known: {', '.join(MODES)}")
        if params not in PARAM_SETS:
            raise TrainError(f"unknown parameter set {params!r}; known: {', '.join(PARAM_SETS)}")
        lo, hi = nu_range
        if not 0 < lo < hi:
            raise TrainError(f"nu_range must satisfy 0 < lo < hi, got {nu_range}")
        if nu is not None and not nu > 0:
            raise TrainError(f"fixed nu must be positive, got {nu}")
        if eps < 0 or (eps == 0 and (nu is None and lo < 1 or nu is not None and nu < 1)):
            raise TrainError(f"eps must be > 0 when nu can be below 1 (got eps={eps}, nu={nu}, range={nu_range})")
        if epochs is not None and epochs < 0:
            raise TrainError(f"BackSlash epochs must be >= 0 or None, got {epochs}")
        self.lam, self.fixed_nu, self.eps, self.per_tensor = lam, nu, eps, per_tensor
        self.mode, self.epochs, self.params, self.nu_range = mode, epochs, params, nu_range
        self.active = True
        self.tensors: list[nn.Parameter] = []
        self.n = 0
        self._nu_last: torch.Tensor | list[float] = []
        self._nu_sum: torch.Tensor | float = 0.0
        self._nu_count = 0
        self._weights: torch.Tensor | None = None

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        pairs = rate_parameters(model, self.params)
        if not pairs:
            what = "trainable matrices (parameters with >= 2 dims)" if self.params == "matrices" else "trainable parameters"
            raise TrainError(f"BackSlash: {type(model).__name__} has no {what} to apply the rate to")
        self.tensors = [p for _, p in pairs]
        self.n = sum(p.numel() for p in self.tensors)
        self._weights = torch.tensor([float(p.numel()) for p in self.tensors], dtype=torch.float64,
                                     device=self.tensors[0].device)

    def on_epoch_begin(self, model: nn.Module, epoch: int) -> None:
        self.active = self.epochs is None or epoch < self.epochs
        self._nu_sum, self._nu_count = 0.0, 0

    @property
    def nu_last(self) -> list[float]:
        """The shape(s) used at the last step, one per tensor (read from the device on demand)."""
        v = self._nu_last
        return v.tolist() if isinstance(v, torch.Tensor) else list(v)

    def _record(self, nu: torch.Tensor) -> None:
        self._nu_last = nu
        self._nu_sum = self._nu_sum + (nu * self._weights).sum()  # stays on the device
        self._nu_count += 1

    def current_nu(self) -> np.ndarray:
        """The shape(s) to use now: the fixed one, or re-estimated from the parameters."""
        if self.fixed_nu is not None:
            nu = np.full(len(self.tensors), float(self.fixed_nu))
        else:
            nu = estimate_nu(self.tensors, self.per_tensor, self.nu_range)
        self._record(torch.from_numpy(nu).to(self._weights.device))
        return nu

    def step_(self, step: int) -> None:
        """One rate step on the parameters (``mode="step"``), shape re-estimated in the same pass.

        Raises :class:`TrainError` naming ``step`` and lambda when the parameters are no longer finite
        (read from the moment sums of the same pass, so it costs no extra pass: every step on CPU,
        every 100 steps elsewhere, where reading them waits for the device).
        """
        if self.update == "proximal":
            backslash_prox_(self.tensors, self.lam, self.current_nu(), self.eps, self.n)
            return
        sums: list[torch.Tensor] = []
        nu = backslash_step_(self.tensors, self.lam, self.fixed_nu, self.eps, self.n, per_tensor=self.per_tensor,
                             nu_range=self.nu_range, sums_out=sums)
        self._record(nu)
        if sums and (self.tensors[0].device.type == "cpu" or step % 100 == 0) and not bool(torch.isfinite(sums[0]).all()):
            raise TrainError(self.failure_hint(step))

    def failure_hint(self, step: int | None = None) -> str:
        """The one-line error for parameters or a loss that stopped being finite under this rate."""
        at = f" at step {step}" if step is not None else ""
        return (f"{type(self).__name__}: parameters became NaN or infinite{at} with lambda={self.lam:g}; "
                "lower lambda (the last checkpoint is kept)")

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if self.mode != "loss" or not self.active or self.lam == 0:
            return None
        return self.lam * rate(self.tensors, self.current_nu(), self.eps)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if self.mode == "step" and self.active and self.lam > 0:
            self.step_(step)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict:
        nu_mean = float(self._nu_sum) / (self.n * self._nu_count) if self._nu_count else None
        with torch.no_grad():
            nu_now = estimate_nu(self.tensors, False, self.nu_range)[0]
            zeros = sum(int((p == 0).sum()) for p in self.tensors) / self.n
        return {"rate_active": self.active, "rate_nu_mean": nu_mean, "rate_nu_fit": float(nu_now),
                "rate_exact_zero_frac": zeros}

    def state_dict(self) -> dict:
        return {"nu_last": self.nu_last}

    def load_state_dict(self, state: dict) -> None:
        self._nu_last = list(state.get("nu_last", []))


def make_rate_callback(kind: str, lam: float, *, epochs: int | None = None, eps: float | None = None,
                       per_tensor: bool = False, mode: str = "step", params: str = "matrices",
                       update: str = "subgradient") -> BackSlash | None:
    """``none`` -> None; ``backslash`` (adaptive nu, eps 1); ``l1`` (nu 1); ``l2`` (nu 2, eps 0).

    ``update="proximal"`` uses the soft-threshold step (:func:`backslash_prox_`) instead of the
    subgradient step.
    """
    if kind not in RATES:
        raise TrainError(f"unknown rate {kind!r}; known: {', '.join(RATES)}")
    if kind == "none":
        return None
    nu = {"backslash": None, "l1": 1.0, "l2": 2.0}[kind]
    default_eps = 0.0 if kind == "l2" else 1.0
    return BackSlash(lam, nu=nu, eps=default_eps if eps is None else eps, per_tensor=per_tensor, mode=mode,
                     epochs=epochs, params=params, update=update)
