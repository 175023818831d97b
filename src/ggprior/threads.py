"""How many threads to run: the CPUs this process may use, and the ones actually free.

PyTorch and numba default to one thread per core of the machine. In a container limited by a
cgroup CPU quota, or on a machine where other processes keep cores busy, that oversubscribes:
threads that wait for each other at every parallel region stall whenever one of them shares
its core, and spinning threads burn the CPU time they are waiting for (the pipeline's CPU time
grew 4.3x on a busy 2-core machine). :func:`configure_threads` sets both libraries' intra-op
thread count from what is really there:

* :func:`available_cpus`: the affinity mask (``os.sched_getaffinity``), capped by the cgroup
  CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``) rounded up;
* with ``adapt=True`` (default), also the CPUs left idle by other processes, measured from
  ``/proc/stat`` over a short window (at least 1).

An explicit ``n`` (``--threads``) or the ``GGPRIOR_THREADS`` environment variable overrides.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", QUOTA may be "max"); None = no limit."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = no limit)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process from the text of /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (v2 or v1); None = none."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _own_cgroup_paths(proc_cgroup)
    limits = []
    if v2 is not None:
        rel = Path(v2.lstrip("/"))
        for d in [rel, *rel.parents]:
            text = _read(root / d / "cpu.max")
            if text is not None and (lim := parse_cpu_max(text)) is not None:
                limits.append(lim)
    for base in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        rel = Path((v1 or "/").lstrip("/"))
        for d in [rel, *rel.parents]:
            q = _read(root / base / d / "cpu.cfs_quota_us")
            p = _read(root / base / d / "cpu.cfs_period_us")
            if q is not None and p is not None and (lim := parse_cfs(q, p)) is not None:
                limits.append(lim)
    return min(limits) if limits else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        n = os.cpu_count() or 1
    lim = cgroup_cpu_limit()
    if lim is not None:
        n = min(n, math.ceil(lim))
    return max(1, n)


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(total, idle) jiffies of the aggregate ``cpu`` line of /proc/stat (idle includes iowait)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(t) for t in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8])  # guest time is already counted in user
            return total, idle
    raise ValueError("no aggregate cpu line in /proc/stat")


def idle_cpus(window: float = 0.25) -> float | None:
    """How many CPUs of the machine were idle over ``window`` seconds (None if unknown)."""
    a = _read(Path("/proc/stat"))
    if a is None:
        return None
    time.sleep(window)
    b = _read(Path("/proc/stat"))
    if b is None:
        return None
    (t0, i0), (t1, i1) = parse_proc_stat(a), parse_proc_stat(b)
    if t1 <= t0:
        return None
    return (i1 - i0) / (t1 - t0) * (os.cpu_count() or 1)


def choose_threads(available: int, idle: float | None) -> int:
    """Threads for ``available`` CPUs of which ``idle`` (machine-wide, may be None) are free: >= 1."""
    if idle is None:
        return max(1, available)
    return max(1, min(available, int(idle + 0.5)))


def configure_threads(n: int | None = None, *, adapt: bool = True) -> int:
    """Set torch's (and numba's) intra-op threads; returns the count.

    ``n`` (e.g. ``--threads``) or ``GGPRIOR_THREADS`` wins; otherwise :func:`available_cpus`,
    lowered to the CPUs measured idle when ``adapt``.
    """
    if n is None and os.environ.get("GGPRIOR_THREADS", "").strip():
        n = int(os.environ["GGPRIOR_THREADS"])
    if n is None:
        avail = available_cpus()
        n = choose_threads(avail, idle_cpus() if adapt and avail > 1 else None)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    # torch before numba: with numba's OpenMP pool started first, torch's own parallel regions (the
    # elementwise kernels of a backward pass) ran 2.3x slower here (calibrating SmolLM2: 5.1 against 2.2 s a
    # block on 2 cores; matrix products unaffected)
    import torch

    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass
    torch.set_num_threads(n)  # last: starting numba's OpenMP pool resets the process's OpenMP thread count
    return n
