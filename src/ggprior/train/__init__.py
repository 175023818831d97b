"""Training: a small trainer with callbacks (:mod:`.loop`), rate-constrained training (:mod:`.backslash`:
BackSlash, L1/L2), ACT on activations (:mod:`.act`), gradient snapshots (:mod:`.snapshots`) and
one-call runs with compression figures (:mod:`.run`)."""

from .act import ACT, activation_bits
from .backslash import BackSlash, backslash_step_, estimate_nu, make_rate_callback, rate, rate_parameters
from .loop import Callback, TrainConfig, TrainError, evaluate, train
from .snapshots import GradientSnapshots

__all__ = [
    "ACT", "BackSlash", "Callback", "GradientSnapshots", "TrainConfig", "TrainError", "activation_bits",
    "backslash_step_", "estimate_nu", "evaluate", "make_rate_callback", "rate", "rate_parameters", "train",
]
