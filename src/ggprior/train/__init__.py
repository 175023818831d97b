"""Training: a small trainer with callbacks (:mod:`.loop`) and rate-constrained training (:mod:`.backslash`)."""

from .backslash import BackSlash, estimate_nu, make_rate_callback, rate, rate_parameters
from .loop import Callback, TrainConfig, TrainError, evaluate, train

__all__ = [
    "BackSlash", "Callback", "TrainConfig", "TrainError", "estimate_nu", "evaluate", "make_rate_callback",
    "rate", "rate_parameters", "train",
]
