"""Process groups with timeouts, a local multi-process launcher, and DDP wrapping per method.

Two ways to start N workers:

- ``torchrun --nproc-per-node N script.py ...``: each worker finds RANK / WORLD_SIZE / MASTER_ADDR /
  MASTER_PORT in its environment; :func:`from_env` reads them and :func:`init_worker` joins.
- :func:`launch` (what ``--workers N`` uses): spawns N local processes that meet on a free
  localhost port. When a worker dies or raises, the others are stopped and :class:`GCTError`
  names the worker and its exit code or error; nothing hangs.

Every process group gets a ``timeout``: a collective that waits longer (a worker stuck or gone)
raises instead of blocking forever. Backend: ``gloo`` on CPU, ``nccl`` when the device is CUDA.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from ..io.atomic import write_text
from .hook import CommStats, GCTConfig, GCTError, counting_hook, powersgd_elements, register_gct

METHODS = ("allreduce", "fp16", "powersgd", "gct")


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def from_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def init_worker(rank: int, world: int, *, port: int | None = None, timeout: float = 120.0,
                device: str = "cpu") -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA) with ``timeout`` seconds per collective.

    ``port`` None means torchrun's environment (``env://``); else ``tcp://127.0.0.1:port``.
    Returns this worker's device (``cuda:<local rank>`` for CUDA).
    """
    if world < 1 or not 0 <= rank < world:
        raise GCTError(f"bad rank {rank} for {world} workers")
    if timeout <= 0:
        raise GCTError(f"timeout must be positive, got {timeout}")
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    init = "env://" if port is None else f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return dev


def _fp32_bytes(state, bucket: dist.GradBucket) -> int:
    return bucket.buffer().numel() * bucket.buffer().element_size()


def _fp16_bytes(state, bucket: dist.GradBucket) -> int:
    return bucket.buffer().numel() * 2


def _powersgd_bytes(state: psgd.PowerSGDState, bucket: dist.GradBucket) -> int:
    return 4 * powersgd_elements(state, bucket)


def wrap_ddp(model: nn.Module, method: str, device: torch.device, *, gct: GCTConfig | None = None,
             powersgd_rank: int = 2, powersgd_start: int = 10, bucket_cap_mb: float | None = None
             ) -> tuple[DDP, CommStats]:
    """``model`` in DDP with the communication hook of ``method``, and the hook's :class:`CommStats`.

    ``allreduce``: fp32 allreduce (torch's ``allreduce_hook``); ``fp16``: torch's
    ``fp16_compress_hook``; ``powersgd``: torch's PowerSGD (rank ``powersgd_rank``, error feedback,
    plain allreduce for the first ``powersgd_start`` steps); ``gct``: :func:`~.hook.gct_hook` via
    :func:`~.hook.register_gct`. ``bucket_cap_mb`` is DDP's bucket size (default: DDP's 25 MB).
    Buffers are synced once at start, not in every forward pass, so evaluating on one
    worker alone cannot leave the others waiting in a collective.
    """
    if method not in METHODS:
        raise GCTError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    model.to(device)
    extra = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
              **extra)
    if method == "gct":
        return ddp, register_gct(ddp, gct).stats
    stats = CommStats()
    if method == "allreduce":
        ddp.register_comm_hook(None, counting_hook(default_hooks.allreduce_hook, stats, _fp32_bytes))
    elif method == "fp16":
        ddp.register_comm_hook(None, counting_hook(default_hooks.fp16_compress_hook, stats, _fp16_bytes))
    else:
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                   start_powerSGD_iter=powersgd_start, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, counting_hook(psgd.powerSGD_hook, stats, _powersgd_bytes))
    return ddp, stats


def _entry(rank: int, fn: Callable, world: int, port: int, timeout: float, device: str, out: str,
           args: tuple, forked: bool) -> None:
    if forked:
        torch.set_num_threads(1)  # before any op: a forked child must not enter the parent's OpenMP pool
    init_worker(rank, world, port=port, timeout=timeout, device=device)
    try:
        result = fn(rank, world, *args)
        write_text(Path(out) / f"rank{rank}.json", json.dumps(result, default=float) + "\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)


def launch(fn: Callable, workers: int, args: tuple = (), *, timeout: float = 120.0, device: str = "cpu",
           deadline: float | None = None, start_method: str = "spawn") -> list[dict]:
    """Run ``fn(rank, workers, *args)`` in ``workers`` spawned processes joined in a process group.

    ``fn`` must be importable (module level) and return a JSON-able dict; the dicts come back in
    rank order. ``device`` picks the backend (gloo for "cpu", nccl for "cuda"); ``timeout`` bounds
    every collective. A worker that raises or dies stops the others and raises :class:`GCTError`; so does the
    whole run passing ``deadline`` seconds (default: none). ``start_method="fork"`` (CPU only)
    skips re-importing everything in each worker, which is what the tests use; forked workers
    run single-threaded.
    """
    if workers < 1:
        raise GCTError(f"need at least one worker, got {workers}")
    if start_method not in ("spawn", "fork") or (start_method == "fork" and device != "cpu"):
        raise GCTError(f"start_method must be 'spawn', or 'fork' on CPU; got {start_method!r} on {device!r}")
    if start_method == "fork":
        import torch._dynamo  # noqa: F401  (DDP imports it lazily: once here, not in every forked worker)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ggprior-dp-") as out:
        ctx = mp.start_processes(_entry, args=(fn, workers, port, timeout, device, out, args, start_method == "fork"),
                                 nprocs=workers, join=False, start_method=start_method)
        t0 = time.monotonic()
        try:
            while not ctx.join(timeout=0.5):
                if deadline is not None and time.monotonic() - t0 > deadline:
                    raise GCTError(f"distributed run passed its deadline of {deadline:.0f} s; workers stopped")
        except mp.ProcessExitedException as e:
            raise GCTError(f"worker {e.error_index} of {workers} died (exit code {e.exit_code}); "
                           "the other workers were stopped") from e
        except mp.ProcessRaisedException as e:
            raise GCTError(f"worker {e.error_index} of {workers} failed: {_last_line(e.msg)}; "
                           "the other workers were stopped") from e
        finally:  # any way out (an error, SIGTERM turned into an exception) stops the workers first
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for r in range(workers):
            path = Path(out) / f"rank{r}.json"
            if not path.is_file():
                raise GCTError(f"worker {r} of {workers} ended without a result")
            results.append(json.loads(path.read_text()))
    return results
