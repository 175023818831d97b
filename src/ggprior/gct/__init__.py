"""Data-parallel training on ``torch.distributed`` with GCT, gradient-constrained communication."""

from .codec import CODERS, decode_frame, encode_frame, encode_raw, rate_quantize
from .hook import (
    EXCHANGES,
    CommStats,
    GCTConfig,
    GCTError,
    GCTState,
    counting_hook,
    exchange,
    gct_hook,
    register_gct,
    shard_bounds,
)
from .launch import METHODS, from_env, init_worker, launch, wrap_ddp

__all__ = [
    "CODERS", "EXCHANGES", "METHODS", "CommStats", "GCTConfig", "GCTError", "GCTState", "counting_hook",
    "decode_frame", "encode_frame", "encode_raw", "exchange", "from_env", "gct_hook", "init_worker", "launch",
    "rate_quantize", "register_gct", "shard_bounds", "wrap_ddp",
]
