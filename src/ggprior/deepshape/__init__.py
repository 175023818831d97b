"""DeepShape (paper Algorithm 1): reshape trained weights toward a target GG.

:mod:`.remap` reshapes one group of values (:func:`reshape_values`; the sort-based
reference it is tested against, :func:`reshape_values_reference`, is in :mod:`.reshape`), :mod:`.model` a whole model (selection, pooling,
the finer-grid fallback), :mod:`.finetune` alternates reshaping and fine-tuning.

The package is callable: ``ggprior.deepshape(source, k_gamma, k_beta)`` is
:func:`ggprior.deepshape.deepshape`, so the top-level name is not hidden by the package.
"""

import sys as _sys
import types as _types

from .model import DeepShapeResult, deepshape, deepshape_, reshape_model_, select_names
from .remap import reshape_values, reshape_values_fast
from .reshape import (
    BIN_WIDTH,
    MIN_BETA_BINS,
    MIN_NUMEL,
    N_MIN,
    ROUNDINGS,
    SELECT,
    TAILS,
    ShapeReport,
    cumulative_counts,
    grid_entropy,
    largest_remainder,
    reshape_values_reference,
)


def __getattr__(name: str):
    if name in ("deepshape_finetune", "summarize_reports"):  # imports the trainer: on first use only
        from . import finetune

        return getattr(finetune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> DeepShapeResult:
        return deepshape(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
