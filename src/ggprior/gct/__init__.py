"""Data-parallel training on ``torch.distributed`` with GCT, gradient-constrained communication."""

from .codec import CODERS, decode_frame, encode_frame, rate_quantize
from .hook import CommStats, GCTConfig, GCTError, GCTState, counting_hook, exchange, gct_hook
from .launch import METHODS, from_env, init_worker, launch, wrap_ddp

__all__ = [
    "CODERS", "METHODS", "CommStats", "GCTConfig", "GCTError", "GCTState", "counting_hook", "decode_frame",
    "encode_frame", "exchange", "from_env", "gct_hook", "init_worker", "launch", "rate_quantize", "wrap_ddp",
]
