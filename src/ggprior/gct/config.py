"""GCT's settings (:class:`GCTConfig`) and its error (:class:`GCTError`); see :mod:`.hook`."""

from dataclasses import dataclass

from .codec import CODERS

EXCHANGES = ("auto", "allgather", "reduce_scatter")
AUTO_ALLGATHER_MAX = 2


class GCTError(RuntimeError):
    """A distributed run that cannot go on: bad settings, or a worker that died or timed out."""


@dataclass
class GCTConfig:
    """GCT settings (see the module docstring)."""

    coder: str = "ans"
    rel_step: float = 0.05
    lam: float = 0.0
    error_feedback: bool = True
    grad_rate: float = 0.0
    h_max: float = 100.0
    ema: float = 0.9
    exchange: str = "auto"
    async_coding: bool = True

    def validate(self) -> None:
        if self.coder not in CODERS:
            raise GCTError(f"unknown gradient coder {self.coder!r}; known: {', '.join(CODERS)}")
        if self.exchange not in EXCHANGES:
            raise GCTError(f"unknown GCT exchange {self.exchange!r}; known: {', '.join(EXCHANGES)}")
        if not (self.rel_step > 0 and self.lam >= 0 and self.grad_rate >= 0 and self.h_max > 0 and 0 <= self.ema < 1):
            raise GCTError(f"need rel_step > 0, lam >= 0, grad_rate >= 0, h_max > 0, 0 <= ema < 1: {self}")

    def exchange_for(self, world: int) -> str:
        """The exchange used at ``world`` workers (``auto`` resolved)."""
        if self.exchange != "auto":
            return self.exchange
        return "allgather" if world <= AUTO_ALLGATHER_MAX else "reduce_scatter"
