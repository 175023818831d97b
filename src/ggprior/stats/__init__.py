"""GG statistics of a model: every tensor, group and pool of its weights (:mod:`.tensors`), and of its
activations and gradients through runtime hooks (:mod:`.hooks`). Imports ``gg`` and ``io`` only."""

from .hooks import (
    HookError,
    StatsCollector,
    activation_statistics,
    best_law,
    first_tensor,
    gradient_statistics,
    masked,
    tensor_rows,
    transformer_blocks,
)
from .tensors import GROUPS, LINEAR_ROW, MODEL_ROW, fit_model, is_linear_weight, tensor_group
