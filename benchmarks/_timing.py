"""The benchmarks' shared timer: best of a few runs, in wall time and in CPU time."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int = 3,
            cpu_clock: Callable[[], float] = time.process_time) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds by ``cpu_clock``, the last result) over ``repeat`` runs."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), cpu_clock()
        out = fn()
        cpu = min(cpu, cpu_clock() - c0)
        wall = min(wall, time.perf_counter() - t0)
    return wall, cpu, out
