"""GCT: a DDP communication hook that sends entropy-coded, rate-constrained gradients.

Per gradient bucket, on every worker (:func:`gct_hook`):

1. error feedback: x = g + e, e the quantization error this worker left on these parameters last step;
2. step = ``rel_step`` * RMS(x) (the RMS in float64, so a spike cannot overflow it), one float32 per
   message; q = :func:`~.codec.rate_quantize` (x, step, ``lam``) -- plain rounding, or the
   rate-constrained choice when ``lam > 0``; e <- x - step q;
3. the integers are entropy-coded (``coder``: ``ans`` or ``eg``) and exchanged (``exchange``):

   - ``allgather``: every worker's whole frame goes to every worker (all_gather of the lengths, then
     of the zero-padded bytes); each worker decodes all frames and averages. A worker sends
     (W - 1) x its payload on a ring, so this grows with the world size W.
   - ``reduce_scatter``: the quantized bucket is cut into W contiguous shards, each coded as its own
     frame; an all_to_all sends shard j to worker j; worker j decodes the W frames of its shard,
     averages them, re-quantizes the average (step ``rel_step`` * its RMS, its own error feedback
     e2 on that shard) and codes it; an all_gather of the coded shards gives every worker the
     whole average. A worker sends about (W - 1) / W of its payload in each phase, about 2x the
     coded payload in all at any W.
   - ``auto`` (default): ``allgather`` for W <= ``AUTO_ALLGATHER_MAX`` (2: equal bytes there, one
     quantization and one round fewer), else ``reduce_scatter``;
4. optional gradient-rate term (``grad_rate`` > 0, backslash-notes.md "GCT"): the rate R = ||g||_1
   of the gradient has gradient H sign(g); H is approximated by a diagonal secant estimate
   h = clamp(dg / dtheta, 0, ``h_max``) from consecutive steps' averaged gradients and parameters
   (identical on every worker, so no extra communication), smoothed by an EMA, and
   ``grad_rate`` * h * sign(g) is added to the averaged gradient.

**State survives DDP's bucket rebuild.** DDP re-forms its buckets after the first iteration, so
a bucket index names different parameters before and after. Residuals and curvature history are
kept per bucket *layout* (the identities and sizes of the bucket's parameters); a layout seen
for the first time takes each parameter's slice from whichever earlier layout held it, so every
value stays on its parameter.

**Asynchronous.** The hook only records the bucket and returns a :class:`torch.futures.Future`;
one background thread per state quantizes, codes, runs the collectives (on a process group of
its own, with the parent group's timeout) and decodes, bucket after bucket in DDP's order, and
completes the future. Coding bucket k thus overlaps the backward pass that fills bucket k + 1
(as far as free CPU allows). ``async_coding=False`` does the same work inside the hook.

**Faults.** A bucket that cannot be coded (non-finite values, integers beyond ``codec.Q_MAX``, a
coder error) is sent as raw float32 (``codec.encode_raw``); its residual is left as it was and
nothing is raised. At the first exchange the workers compare their GCT settings; a difference,
a bucket of another size, or a failed collective (a worker died, or did not answer within the
timeout) completes the future with :class:`GCTError`, which DDP raises from ``backward()``;
later buckets fail at once, so nothing hangs.

Counts (:class:`CommStats`): the coded bytes each worker produces per step (``payload_bytes``; of
them, the reduce-scatter exchange's second-stage frame in ``stage2_bytes``),
the bytes it puts on the wire (``wire_bytes``: padded all_gather blocks forwarded on a ring, its
all_to_all chunks, the length headers), the raw-fallback buckets, and for the first-stage
integers the Exp-Golomb order-0 and best-order sizes and the zeroth-order entropy (from the
histogram; ``detailed=False`` in the state skips these). Baseline hooks (plain allreduce, fp16,
PowerSGD) are wrapped by :func:`counting_hook` with their payload sizes.

Modules: this one (the hook, its state and the per-bucket exchange; it re-exports the names below),
:mod:`.config` (:class:`GCTConfig`, :class:`GCTError`), :mod:`.collectives` (byte collectives,
:func:`exchange`, :func:`shard_bounds`, coding and decoding frames) and :mod:`.counts`
(:class:`CommStats`, :func:`counting_hook`, :func:`powersgd_elements`).
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .codec import decode_frame, encode_frame, encode_raw
from .collectives import (  # noqa: F401  (exchange is part of this module's API)
    _all_to_all_bytes,
    _code,
    _collective_error,
    _decode_into,
    _dequant,
    _gather_bytes,
    _one_line,
    exchange,
    shard_bounds,
)
from .config import AUTO_ALLGATHER_MAX, EXCHANGES, GCTConfig, GCTError  # noqa: F401  (re-exported)
from .counts import CommStats, _count, counting_hook, powersgd_elements  # noqa: F401  (re-exported)


def _group_timeout(group: dist.ProcessGroup | None) -> timedelta | None:
    try:
        pg = group if group is not None else dist.group.WORLD
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 -- not every backend exposes its options; then torch's default
        return None


class _Layout:
    """A bucket's parameters: their identities, sizes and offsets in the flat buffer."""

    def __init__(self, params: list[torch.Tensor]):
        self.ids = tuple(id(p) for p in params)
        self.sizes = tuple(p.numel() for p in params)
        self.offsets = tuple(np.cumsum((0,) + self.sizes[:-1]).tolist())
        self.numel = sum(self.sizes)


class GCTState:
    """What :func:`gct_hook` keeps between steps: per-parameter residuals and history, the counts.

    With ``process_group`` None and a process group initialised, the exchanges run on a new
    group over the same workers (so they never interleave with DDP's own collectives) with the
    default group's timeout (or ``timeout`` seconds). Create the state on every worker at the
    same point (it is a collective call then), e.g. right after wrapping the model in DDP.
    """

    def __init__(self, config: GCTConfig | None = None, process_group: dist.ProcessGroup | None = None, *,
                 timeout: float | None = None, detailed: bool = True):
        self.config = config or GCTConfig()
        self.config.validate()
        self.group = process_group
        if process_group is None and dist.is_available() and dist.is_initialized():
            t = timedelta(seconds=timeout) if timeout is not None else _group_timeout(None)
            self.group = dist.new_group(timeout=t) if t is not None else dist.new_group()
        self.detailed = detailed
        self.flat: dict[str, dict[tuple, torch.Tensor]] = {}  # state name -> layout key -> flat tensor
        self.layouts: dict[tuple, _Layout] = {}
        self.stats = CommStats()
        self.failed: BaseException | None = None
        self.checked = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- per-parameter flat state that survives bucket rebuilds --------------------------------

    def get(self, name: str, layout: _Layout, like: torch.Tensor) -> torch.Tensor | None:
        """The ``name`` state of ``layout``'s parameters (rebuilt from earlier layouts), or None if never set."""
        store = self.flat.setdefault(name, {})
        key = (layout.ids, layout.sizes)
        if key in store:
            return store[key]
        wanted = set(layout.ids)
        pieces: dict[int, torch.Tensor] = {}
        for k in [k for k in store if wanted.intersection(k[0])]:
            old = self.layouts[k]
            t = store.pop(k)
            for pid, off, n in zip(old.ids, old.offsets, old.sizes, strict=True):
                pieces[pid] = t[off:off + n]
            # parameters of the old layout that are not in this one keep their slices for a later layout
            rest = [(pid, off, n) for pid, off, n in zip(old.ids, old.offsets, old.sizes, strict=True)
                    if pid not in wanted]
            if rest:
                sub = _Layout.__new__(_Layout)
                sub.ids, sub.sizes = tuple(r[0] for r in rest), tuple(r[2] for r in rest)
                sub.offsets = tuple(np.cumsum((0,) + sub.sizes[:-1]).tolist())
                sub.numel = sum(sub.sizes)
                self.layouts[(sub.ids, sub.sizes)] = sub
                store[(sub.ids, sub.sizes)] = torch.cat([pieces[r[0]] for r in rest])
        if not pieces:
            return None
        out = torch.cat([pieces[pid] if pid in pieces and pieces[pid].numel() == n else like.new_zeros(n)
                         for pid, n in zip(layout.ids, layout.sizes, strict=True)])
        store[key] = out
        return out

    def put(self, name: str, layout: _Layout, value: torch.Tensor) -> None:
        key = (layout.ids, layout.sizes)
        self.layouts[key] = layout
        self.flat.setdefault(name, {})[key] = value

    # -- the background worker -----------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._queue = queue.Queue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                                name="ggprior-gct")
                self._thread.start()
        self._queue.put(job)

    @staticmethod
    def _run(q: queue.Queue) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            job()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the background thread and wait for it (a thread that touched torch and is still alive at
        interpreter exit can abort the process); a later exchange starts a new one."""
        with self._lock:
            thread, self._thread = self._thread, None
            if self._queue is not None:
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _check_configs(state: GCTState, world: int) -> None:
    mine = {k: v for k, v in asdict(state.config).items() if k != "async_coding"}
    mine["exchange"] = state.config.exchange_for(world)
    every: list = [None] * world
    dist.all_gather_object(every, mine, group=state.group)
    for r, other in enumerate(every):
        if other != mine:
            diff = {k: (mine.get(k), other.get(k)) for k in set(mine) | set(other) if mine.get(k) != other.get(k)}
            raise GCTError(f"GCT settings differ across workers (this worker vs worker {r}): "
                           + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in sorted(diff.items())))
    state.checked = True


def _secant_term(state: GCTState, layout: _Layout, params: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """grad_rate * h * sign(g), h the EMA of the clamped diagonal secant curvature (0 on the first step)."""
    cfg = state.config
    theta = torch.cat([p.detach().reshape(-1).float() for p in params])
    prev_theta, prev_g = state.get("prev_theta", layout, g), state.get("prev_g", layout, g)
    state.put("prev_theta", layout, theta)
    state.put("prev_g", layout, g.clone())
    if prev_theta is None or prev_g is None:
        return torch.zeros_like(g)
    dth, dg = theta - prev_theta, g - prev_g
    moved = dth.abs() > 1e-12
    h = torch.where(moved, dg / torch.where(moved, dth, torch.ones_like(dth)), torch.zeros_like(dg))
    h = h.clamp_(0.0, cfg.h_max)
    curv = state.get("curv", layout, g)
    curv = h if curv is None else curv.mul_(cfg.ema).add_(h, alpha=1 - cfg.ema)
    state.put("curv", layout, curv)
    return cfg.grad_rate * curv * torch.sign(g)


def _exchange_bucket(state: GCTState, buf: torch.Tensor, layout: _Layout, params: list[torch.Tensor],
                     index: int) -> torch.Tensor:
    """The averaged gradient of one bucket (runs on the state's thread, or inline)."""
    cfg, group, stats = state.config, state.group, state.stats
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    who = f"rank {rank}, bucket {index}"
    t0 = time.perf_counter()
    mode = cfg.exchange_for(world)
    if not state.checked:
        try:
            _check_configs(state, world)
        except RuntimeError as e:
            raise e if isinstance(e, GCTError) else _collective_error(rank, e) from e
    x = buf.detach().float()
    res = state.get("residual", layout, x) if cfg.error_feedback else None
    if res is not None:
        x = x + res
    total = torch.zeros_like(x)
    n = x.numel()
    device = buf.device
    g = buf.detach().float()
    if mode == "allgather":
        frame, new_res, qn, step = _code(x, g, cfg)
        code_s = time.perf_counter() - t0
        try:
            frames, block = _gather_bytes(frame, group, device)
        except RuntimeError as e:
            raise _collective_error(rank, e) from e
        t1 = time.perf_counter()
        _decode_into(frames, None, n, total, who, own=(rank, _dequant(qn, step, g, x)))
        total /= world
        stats.payload_bytes += len(frame)
        stats.wire_bytes += (world - 1) * (8 + block)
    else:
        bounds = shard_bounds(n, world)
        _, new_res, qn, step = _code(x, g, cfg, whole=False)
        if qn is None:  # raw: every shard raw
            chunks = [encode_raw(g[bounds[j]:bounds[j + 1]]) for j in range(world)]
        else:
            chunks = [encode_frame(qn[bounds[j]:bounds[j + 1]], step, cfg.coder) for j in range(world)]
        code_s = time.perf_counter() - t0
        try:
            got = _all_to_all_bytes(chunks, group, device)
        except RuntimeError as e:
            raise _collective_error(rank, e) from e
        t1 = time.perf_counter()
        mine = torch.zeros(bounds[rank + 1] - bounds[rank], dtype=x.dtype, device=device)
        lo, hi = bounds[rank], bounds[rank + 1]
        for i, f in enumerate(got):
            if i == rank:
                mine += _dequant(None if qn is None else qn[lo:hi], step, g[lo:hi], x)
                continue
            vals, step_i = decode_frame(f)
            if vals.size != mine.numel():
                raise GCTError(f"{who}: worker {i} sent {vals.size} values of shard {rank} where {mine.numel()} "
                               "were expected; the workers' models or bucket layouts differ")
            mine += torch.from_numpy(vals).to(device, x.dtype) * step_i
        mine /= world
        # second stage: this worker's shard of the average, re-quantized with its own error feedback
        full_e2 = state.get("residual2", layout, x) if cfg.error_feedback else None
        y = mine + full_e2[lo:hi] if full_e2 is not None else mine
        frame2, res2, qn2, step2 = _code(y, mine, cfg)
        if cfg.error_feedback and res2 is not None:
            if full_e2 is None:
                full_e2 = torch.zeros_like(x)
            full_e2[lo:hi] = res2
            state.put("residual2", layout, full_e2)
        t2 = time.perf_counter()
        code_s += t2 - t1
        try:
            shards, block = _gather_bytes(frame2, group, device)
        except RuntimeError as e:
            raise _collective_error(rank, e) from e
        t1 = time.perf_counter()
        _decode_into(shards, bounds, n, total, who, own=(rank, _dequant(qn2, step2, mine, x)))
        sent = sum(len(c) for j, c in enumerate(chunks) if j != rank)
        stats.payload_bytes += sum(len(c) for c in chunks) + len(frame2)
        stats.stage2_bytes += len(frame2)
        stats.wire_bytes += 8 * 2 * (world - 1) + sent + (world - 1) * block
    code_s += time.perf_counter() - t1
    if cfg.error_feedback and new_res is not None:
        state.put("residual", layout, new_res)
    if cfg.grad_rate > 0:
        total = total + _secant_term(state, layout, params, total)
    _count(stats, qn, n, state.detailed)
    stats.code_seconds += code_s
    return total


def gct_hook(state: GCTState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: quantize, entropy-code, exchange, decode and average one bucket.

    Returns at once with a future that the state's thread completes (see the module docstring).
    """
    t0 = time.perf_counter()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    buf = bucket.buffer()
    params = list(bucket.parameters())
    index, last = bucket.index(), bucket.is_last()
    layout = _Layout(params)

    def job() -> None:
        if state.failed is not None:
            fut.set_exception(state.failed)
            return
        try:
            if layout.numel != buf.numel():
                raise GCTError(f"bucket {index}: parameters hold {layout.numel} values, the buffer {buf.numel()}")
            avg = _exchange_bucket(state, buf, layout, params, index)
            buf.copy_(avg.to(buf.dtype))
        except BaseException as e:  # noqa: BLE001 -- any failure completes the future; DDP raises it in backward
            err = e if isinstance(e, GCTError) else GCTError(f"GCT bucket {index}: {type(e).__name__}: {_one_line(e)}")
            state.failed = err
            fut.set_exception(err)
            return
        state.stats.buckets += 1
        if last:
            state.stats.steps += 1
        fut.set_result(buf)

    if state.config.async_coding:
        state._submit(job)
    else:
        job()
    state.stats.hook_seconds += time.perf_counter() - t0
    return fut


def register_gct(ddp_model: torch.nn.Module, config: GCTConfig | None = None, *, timeout: float | None = None,
                 detailed: bool = True) -> GCTState:
    """Register :func:`gct_hook` on a ``DistributedDataParallel`` model; returns its :class:`GCTState`.

    Call it on every worker, after wrapping and before the first backward pass (it creates the
    exchange's process group, a collective call). ``timeout`` (seconds) bounds every exchange;
    default: the timeout of the DDP model's process group.
    """
    from torch.nn.parallel import DistributedDataParallel

    from .codec import warmup

    if not isinstance(ddp_model, DistributedDataParallel):
        raise GCTError(f"register_gct needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    group = getattr(ddp_model, "process_group", None)
    if group is not None and group == dist.distributed_c10d._get_default_group():
        group = None
    if timeout is None:
        t = _group_timeout(group)
        timeout = t.total_seconds() if t is not None else None
    warmup()
    state = GCTState(config, group, timeout=timeout, detailed=detailed)
    ddp_model.register_comm_hook(state, gct_hook)
    return state
