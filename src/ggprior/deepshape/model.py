"""DeepShape on a whole model: which tensors, per tensor or pooled, and the finer-grid fallback.

A tensor whose fitted target is narrower than the histogram's bins cannot be reshaped on that
grid (BackSlash drives most weights to exactly 0, and the core of such a tensor can have a
fitted beta of a few 1e-6, narrower than the paper's 2^-13 bins). ``fallback_widths`` tries
finer grids in turn; ``skip_unshapeable`` leaves a tensor no grid can reshape as it is and
records why, instead of raising.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io.sources import TensorSource, floating_names, open_source
from ..stats.tensors import is_linear_weight
from .remap import reshape_values
from .reshape import BIN_WIDTH, MIN_NUMEL, SELECT, ShapeReport


def select_names(src: TensorSource, select: str = "matrices", min_numel: int = MIN_NUMEL) -> list[str]:
    """Names of the tensors DeepShape reshapes under a ``select`` policy.

    ``"matrices"``: floating tensors with >= 2 dimensions (linear weights and embeddings);
    ``"linear"``: weight matrices outside embeddings and norms; ``"all"``: every floating
    tensor. Tensors with fewer than ``min_numel`` values are left alone under every policy
    (too few values for a histogram).
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    names = []
    for k in floating_names(src):
        shape = src.shape(k)
        if src.numel(k) < min_numel:
            continue
        if select == "all" or (select == "matrices" and len(shape) >= 2) or (
            select == "linear" and is_linear_weight(k, len(shape))
        ):
            names.append(k)
    return names


@dataclass
class DeepShapeResult:
    """Every tensor of the source (reshaped ones replaced) and one report per reshaped group."""

    tensors: dict[str, torch.Tensor]
    reports: list[ShapeReport]
    reshaped: list[str]
    skipped: list[dict] = field(default_factory=list)


def deepshape(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    k_gamma: float,
    k_beta: float,
    *,
    select: str = "matrices",
    pooled: bool = False,
    min_numel: int = MIN_NUMEL,
    progress: bool = False,
    fallback_widths: Sequence[float] = (),
    skip_unshapeable: bool = False,
    **options,
) -> DeepShapeResult:
    """Apply DeepShape to a model (any :func:`ggprior.io.open_source` source).

    Per tensor by default (each selected tensor gets its own fit and target); ``pooled=True``
    fits and remaps the selected tensors as one population. ``options`` go to
    :func:`reshape_values` (``bin_width``, ``n_min``, ``tails``, ``snap``). A group that cannot
    be reshaped at ``bin_width`` is tried at each of ``fallback_widths`` in turn (e.g.
    ``(BIN_WIDTH / 16,)``); with ``skip_unshapeable`` a group no width can reshape is left as it
    is and listed in ``skipped`` (name and reason) instead of raising the ValueError.
    """
    widths = (options.pop("bin_width", BIN_WIDTH), *fallback_widths)

    def reshape(x: torch.Tensor, name: str) -> tuple[torch.Tensor, ShapeReport] | None:
        for i, width in enumerate(widths):
            try:
                return reshape_values(x, k_gamma, k_beta, bin_width=width, name=name, **options)
            except ValueError as e:
                if i + 1 < len(widths):
                    continue
                if not skip_unshapeable:
                    raise
                skipped.append({"name": name, "reason": str(e)})
        return None

    src = open_source(source)
    names = select_names(src, select, min_numel)
    if not names:
        raise ValueError(f"{src.label}: no tensor matches select={select!r} with >= {min_numel} values")
    tensors = {k: src[k] for k in src}
    reports = []
    skipped: list[dict] = []
    if pooled:
        flat = torch.cat([tensors[k].detach().reshape(-1).to(torch.float32) for k in names])
        done = reshape(flat, f"pooled({len(names)} tensors)")
        if done is not None:
            new, rep = done
            rep.members = list(names)
            reports.append(rep)
            for k, piece in zip(names, new.split([tensors[k].numel() for k in names]), strict=True):
                tensors[k] = piece.reshape(tensors[k].shape).to(tensors[k].dtype)
    else:
        for k in tqdm(names, desc="deepshape", disable=not progress):
            done = reshape(tensors[k], k)
            if done is None:
                continue
            tensors[k], rep = done
            rep.members = [k]
            reports.append(rep)
    reshaped = [k for r in reports for k in r.members]
    return DeepShapeResult(tensors=tensors, reports=reports, reshaped=reshaped, skipped=skipped)


def reshape_model_(model: nn.Module, k_gamma: float, k_beta: float, **kwargs) -> DeepShapeResult:
    """In-place DeepShape on a module's parameters (tied ones once); returns the whole result
    (``kwargs`` as for :func:`deepshape`, e.g. ``fallback_widths`` and ``skip_unshapeable``)."""
    state = dict(model.named_parameters())
    result = deepshape(state, k_gamma, k_beta, **kwargs)
    with torch.no_grad():
        for k in result.reshaped:
            state[k].copy_(result.tensors[k])
    return result


def deepshape_(model: nn.Module, k_gamma: float, k_beta: float, **kwargs) -> list[ShapeReport]:
    """In-place DeepShape on a module's parameters (tied ones once; for reshape + fine-tune loops)."""
    return reshape_model_(model, k_gamma, k_beta, **kwargs).reports
