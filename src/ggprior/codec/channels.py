"""Channel scales: a tensor's quantization step shaped per row and per column by the Fisher information.

A tensor of 2+ dimensions, viewed as ``rows x cols`` (dim 0 by the rest), is quantized as

    q_ij = round(w_ij / (s u_i v_j)),    w_hat_ij = q_ij s u_i v_j,    u_i = 2^(a_i / 8), v_j = 2^(b_j / 8)

with one integer code per row (``a``) and per column (``b``), in eighths of an octave. At high rate the
weighted distortion ``sum F_ij e_ij^2`` at a given rate is least with steps proportional to ``F_ij^(-1/2)``
(the per-tensor rule of :mod:`.allocate`, one level finer); the diagonal Fisher of a linear layer is close
to rank one (output sensitivity times input power), so ``F_ij ~ r_i c_j`` with ``r``, ``c`` its row and
column means, and ``u_i v_j ~ (r_i c_j)^(-1/2)``. The codes are clamped to ``FINER`` octaves below and
``COARSER`` above the tensor's geometric mean: the Fisher is a local, diagonal model, and whole channels
quantized far coarser than the rest move the output more than it predicts (docs/rate_distortion.md). A row
or column no calibration gradient reached (a token the text never used) gets the mean sensitivity.

The scaled tensor ``w / (u v^T)`` is what the step rule, the GG fit and the coders see; the file stores
the codes (``fl``-coded, docs/format.md) and the reader multiplies them back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..io.sources import TensorSource
from . import fixed
from .bits import CodingError

DIV = 8
"""Codes per octave."""
CODE_MAX = 64
"""Largest |code| a file may hold (8 octaves either way)."""
FINER = 2.0
COARSER = 0.5
"""Default clamps, in octaves below / above the tensor's geometric mean step (measured on SmolLM2 and MiniLM:
docs/results/channel_scales)."""


VALUES_PER_CODE = 32
"""A tensor gets channel scales only with at least this many values per code (rows + columns): a few bits a
code then cost at most ~0.2 bit/weight; a 2 x 384 token-type embedding would pay 4 bits/weight."""


def worth_scaling(shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` is large enough for channel scales (2+ dimensions, ``VALUES_PER_CODE``)."""
    if len(shape) < 2:
        return False
    rows, cols = shape[0], math.prod(shape[1:])
    return rows * cols >= VALUES_PER_CODE * (rows + cols)


@dataclass(frozen=True)
class ChannelScales:
    """Integer step codes of one tensor: one per row (dim 0) and one per column (the other dims flattened)."""

    rows: np.ndarray
    cols: np.ndarray

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row and column step factors ``2^(code / 8)`` (float64)."""
        return (torch.from_numpy(np.exp2(self.rows.astype(np.float64) / DIV)),
                torch.from_numpy(np.exp2(self.cols.astype(np.float64) / DIV)))

    def check(self, shape: tuple[int, ...], name: str = "tensor") -> None:
        """Raise CodingError naming ``name`` unless these codes fit a tensor of ``shape``."""
        if len(shape) < 2:
            raise CodingError(f"{name}: channel scales need a tensor of 2+ dimensions, got shape {tuple(shape)}")
        rows, cols = shape[0], math.prod(shape[1:])
        if self.rows.shape != (rows,) or self.cols.shape != (cols,):
            raise CodingError(f"{name}: channel scales for {self.rows.size} rows x {self.cols.size} columns, the "
                              f"tensor has {rows} x {cols}")
        for c in (self.rows, self.cols):
            if c.size and int(np.abs(c).max()) > CODE_MAX:
                raise CodingError(f"{name}: channel scale codes must lie in [-{CODE_MAX}, {CODE_MAX}]")


def _filled(fisher: np.ndarray) -> np.ndarray | None:
    """The Fisher means as float64, entries without evidence (0, non-finite) at the mean; None when none has any."""
    f = np.asarray(fisher, dtype=np.float64).reshape(-1)
    good = np.isfinite(f) & (f > 0)
    return np.where(good, f, f[good].mean()) if good.any() else None


def _codes(fisher: np.ndarray, finer: float, coarser: float) -> np.ndarray:
    f = _filled(fisher)
    if f is None:
        return np.zeros(np.size(fisher), dtype=np.int64)
    lg = -0.5 * np.log2(f)
    lg -= lg.mean()
    return np.clip(np.round(lg * DIV), -round(finer * DIV), round(coarser * DIV)).astype(np.int64)


def channel_scales(row_fisher: np.ndarray, col_fisher: np.ndarray, *, finer: float = FINER,
                   coarser: float = COARSER) -> ChannelScales:
    """Step codes from the Fisher's row and column means: ``u_i v_j ~ (r_i c_j)^(-1/2)``, each factor clamped to
    ``finer`` octaves below and ``coarser`` above its geometric mean."""
    if not (0 <= finer <= CODE_MAX / DIV and 0 <= coarser <= CODE_MAX / DIV):
        raise ValueError(f"channel scale clamps must lie in [0, {CODE_MAX // DIV}] octaves, got {finer}, {coarser}")
    return ChannelScales(_codes(row_fisher, finer, coarser), _codes(col_fisher, finer, coarser))


def weight_factor(scales: ChannelScales, row_fisher: np.ndarray, col_fisher: np.ndarray) -> float:
    """What a tensor's sensitivity weight becomes for its scaled tensor: ``mean(F u^2 v^2) / mean(F)`` under the
    rank-one Fisher ``F_ij ~ r_i c_j`` (1 when the Fisher is zero)."""
    u, v = (f.numpy() for f in scales.factors())
    out = 1.0
    for f, x in ((_filled(row_fisher), u), (_filled(col_fisher), v)):
        if f is not None:
            out *= float((f * x * x).mean() / f.mean())
    return out


def scaled_weights(weights: Mapping[str, float], fisher: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                   finer: float = FINER, coarser: float = COARSER) -> tuple[dict[str, float], dict[str, ChannelScales]]:
    """Channel scales from each tensor's Fisher row and column means (tensors with Fisher, large enough to pay
    for their codes: :func:`worth_scaling`) and the weights of the scaled tensors; other weights unchanged."""
    scales = {k: channel_scales(*f, finer=finer, coarser=coarser) for k, f in fisher.items()
              if float(np.mean(f[0])) > 0 and worth_scaling((np.size(f[0]), np.size(f[1])))}
    return {k: w * weight_factor(scales[k], *fisher[k]) if k in scales else w for k, w in weights.items()}, scales


def divide(t: torch.Tensor, scales: ChannelScales) -> torch.Tensor:
    """The scaled tensor ``t / (u v^T)`` in float32 (float64 for a float64 tensor), in ``t``'s shape."""
    u, v = (f.to(t.device) for f in scales.factors())
    x = t.detach().reshape(t.shape[0], -1).to(torch.float64) / (u[:, None] * v[None, :])
    return x.to(torch.float64 if t.dtype == torch.float64 else torch.float32).reshape(t.shape)


def expand(lo: int, n: int, factors: tuple[torch.Tensor, torch.Tensor], step: float = 1.0) -> torch.Tensor:
    """``step u_i v_j`` (float64) of the flat values ``lo .. lo + n - 1`` of a ``rows x cols`` tensor."""
    u, v = factors
    c = v.numel()
    if n <= 0:
        return torch.empty(0, dtype=torch.float64)
    r0, r1 = lo // c, (lo + n - 1) // c + 1  # the rows the values span: at most n + 2 c products
    return ((step * u[r0:r1, None]) * v[None, :]).reshape(-1)[lo - r0 * c : lo - r0 * c + n]


class ScaledSource(TensorSource):
    """A tensor source whose tensors with channel scales read divided by them (what the quantizer sees)."""

    def __init__(self, src: TensorSource, scales: Mapping[str, ChannelScales]):
        super().__init__(src.label)
        self.src, self.scales = src, scales

    def __getitem__(self, k: str) -> torch.Tensor:
        t = self.src[k]
        return divide(t, self.scales[k]) if k in self.scales else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.src)

    def __len__(self) -> int:
        return len(self.src)

    def __contains__(self, k: object) -> bool:
        return k in self.src

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(name)


def checked(src, quantized: list[str], scales: Mapping[str, ChannelScales]) -> dict[str, ChannelScales]:
    """The channel scales of the quantized tensors, each checked against its tensor's shape (names the source
    lacks are a CodingError; scales of tensors kept raw or stored as aliases are dropped)."""
    unknown = sorted(k for k in scales if k not in src)
    if unknown:
        raise CodingError(f"{src.label}: channel scales for tensors the model does not have: {unknown[:5]}")
    out = {}
    for k in quantized:
        if k in scales:
            scales[k].check(tuple(src.shape(k)), f"{src.label}: tensor {k!r}")
            out[k] = scales[k]
    return out


def encode(scales: ChannelScales) -> tuple[bytes, dict]:
    """The row codes then the column codes, ``fl``-coded: (stream, ``{"qmin", "width"}``)."""
    return fixed.encode(np.concatenate([scales.rows, scales.cols]).astype(np.int64))


def decode(data: bytes | memoryview, rows: int, cols: int, qmin: int, width: int) -> ChannelScales:
    """Codes from :func:`encode`'s stream; raises CodingError for a wrong length or codes out of range."""
    c = fixed.decode(data, rows + cols, qmin, width)
    out = ChannelScales(c[:rows], c[rows:])
    out.check((rows, cols), "channel scales")
    return out
