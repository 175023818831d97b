"""Per-tensor steps for a target size (``save_compressed(target_bits=B)``, ``ggprior compress --target-bits B``).

The target ``B`` is in bits per weight over the quantized tensors, counting what the ``.ggz``
file stores for them: the rANS frequency tables and the coded chunks (as ``ggprior compress``
reports it; the JSON header, raw tensors and side files are not counted). The steps come from
:func:`ggprior.codec.allocate.allocate` (equal slope under each tensor's fitted GG, calibrated to
real code lengths; sensitivity weights optional, uniform by default). The allocation's own side
information is a constant per tensor, so the steps are then corrected against :func:`stored_bits`,
the size the writer will produce (the table it will store and the ideal code length under that
integer table, plus the rANS states of every chunk), by rescaling the allocation's target until
the two agree within 0.2 %. No step is finer than the rANS alphabet allows (``rans.NSYM_MAX``
symbols over the tensor's range), which caps the reachable size near 20 bits/weight. A target the
file cannot reach within 1 % raises :class:`~ggprior.codec.allocate.AllocationError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..io.tensors import parse_size
from . import allocate as alloc
from . import channels, ggmodel, rans, registry
from . import quantizer as quant
from . import trellis as trellis_codec
from .channels import ChannelScales
from .header import (
    _NAME_OF,
    DTYPES,
    FORMAT,
    PREFIX,
    TABLE_CODERS,
    VERSION,
    VERSION_CHANNELS,
    ContainerError,
    chunk_bounds,
)
from .histogram import histogram

TOLERANCE = 0.002
ROUNDS = 6
SAMPLE = 1 << 17
"""Values of a larger tensor the trellis size search codes (``SAMPLE // BLOCK`` evenly spaced blocks, so a tensor
whose rows differ, an embedding, is sampled across them); smaller tensors are coded whole."""
BLOCK = 1 << 10


def stored_bits(t: torch.Tensor, step: float, *, coder: str = "ans", gg_fit: str = "moment", name: str = "tensor",
                chunk_values: int = 1 << 22) -> float:
    """Bits the writer stores for ``t`` at ``step`` with an ``ans`` coder: table + ideal code + chunk states."""
    q = quant.quantize(t, step, name=name).numpy().reshape(-1)
    h = histogram(q)
    gg = ggmodel.fit(h, gg_fit).as_float32()
    _, qmin, freqs = registry.best_rans_table(coder, h, gg)
    f = freqs[h.symbols - qmin].astype(np.float64)
    payload = float(-(h.counts * (np.log2(f) - rans.PROB_BITS)).sum())
    chunks = math.ceil(q.size / chunk_values)
    return 8.0 * len(rans.pack_freqs(freqs)) + payload + chunks * (128 + 8)  # 4 u32 states, a word's rounding


def trellis_bits(t: torch.Tensor, step: float, *, coder: str = "ans", gg_fit: str = "moment", name: str = "tensor",
                 chunk_values: int = 1 << 22, sample: int = SAMPLE) -> float:
    """Bits the writer stores for ``t`` under ``trellis=True`` at the rule step ``step``: the smaller of the trellis
    payloads at ``trellis.file_step(step)`` and the scalar stream (:func:`stored_bits`). A tensor of more than
    ``sample`` values is estimated from evenly spaced blocks of ``BLOCK`` values quantized together: their streams
    scaled to its size, plus their head and tables once per chunk."""
    flat = t.detach().reshape(-1)
    n, ts, states = flat.numel(), trellis_codec.file_step(step, name), trellis_codec.FILE_STATES
    if n <= sample:
        tb = 8.0 * sum(len(trellis_codec.encode(trellis_codec.quantize(flat[a:a + chunk_values], ts, n_states=states,
                                                                       name=name))) for a in range(0, n, chunk_values))
    else:
        x = torch.cat([flat[a:a + BLOCK] for a in np.linspace(0, n - BLOCK, sample // BLOCK).astype(np.int64).tolist()])
        p = trellis_codec.encode(trellis_codec.quantize(x, ts, n_states=states, name=name))
        side = trellis_codec.side_bytes(p)
        tb = 8.0 * ((len(p) - side) * n / x.numel() + side * math.ceil(n / chunk_values))
    return min(tb, stored_bits(t, step, coder=coder, gg_fit=gg_fit, name=name, chunk_values=chunk_values))


def target_steps(
    tensors: Mapping[str, torch.Tensor], names: list[str], target_bits: float, *, coder: str = "ans",
    gg_fit: str = "moment", weights: Mapping[str, float] | None = None, chunk_values: int = 1 << 22,
    trellis: bool = False, jobs: int = 1, extra_bits: float = 0.0,
) -> tuple[dict[str, float], dict]:
    """Steps (name -> float32 step) of the tensors ``names`` meeting ``target_bits`` bits/weight, and a summary.

    ``tensors`` maps names to tensors (loaded on demand); ``weights`` are sensitivity weights per
    tensor (a float each; default 1). ``trellis=True``: the steps are the rules of the writer's trellis
    coding (:func:`trellis_bits`, ``jobs`` threads): the scalar allocation's steps, rescaled by one
    factor until the trellis sizes meet the target. ``extra_bits``: bits stored with these tensors besides
    their streams (channel scales), counted in the size. Raises QuantError naming a tensor with NaN/Inf
    values and AllocationError for a target that cannot be met.
    """
    if coder not in TABLE_CODERS:
        raise alloc.AllocationError(f"a target size needs an rANS coder ({', '.join(TABLE_CODERS)}), got {coder!r}")
    if not isinstance(target_bits, (int, float)) or not math.isfinite(target_bits):
        raise alloc.AllocationError(f"target of {target_bits!r} bits/weight is not a finite number")
    weights = dict(weights or {})
    unknown = sorted(k for k in weights if k not in tensors)  # weights of tensors kept raw are not used
    if unknown:
        raise alloc.AllocationError(f"sensitivity weights for tensors the model does not have: {unknown[:5]}")
    models, fixed, floor = [], {}, {}
    for k in names:
        t = tensors[k]
        if not bool(torch.isfinite(t).all()):
            raise quant.QuantError(f"{k}: contains NaN or Inf values; cannot quantize (store it with --lossless)")
        w = weights.get(k, 1.0)
        if np.ndim(w) != 0 or not math.isfinite(float(w)) or float(w) < 0:
            raise alloc.AllocationError(f"{k}: sensitivity weight must be one finite number >= 0, got {w!r}")
        lo, hi = torch.aminmax(t.detach().reshape(-1))
        if float(lo) == float(hi):  # constant: no GG to fit; a step giving q in {-1, 0, 1} stores it exactly
            fixed[k] = quant.step_for_bits(t, 2, name=k)
            continue
        floor[k] = (float(hi) - float(lo)) / (rans.NSYM_MAX - 3)  # finest step the rANS alphabet allows
        try:
            models.append(alloc.tensor_model(k, t, float(w)))
        except ValueError as err:
            raise alloc.AllocationError(f"{k}: no GG fit for the allocation ({err})") from err

    def size(steps: dict[str, float]) -> float:
        return sum(stored_bits(tensors[k], s, coder=coder, gg_fit=gg_fit, name=k, chunk_values=chunk_values)
                   for k, s in steps.items())

    n = sum(math.prod(tensors[k].shape) for k in names)
    raw_all = sum(math.prod(tensors[k].shape) * torch.finfo(tensors[k].dtype).bits for k in names) / n
    if target_bits >= raw_all:
        raise alloc.AllocationError(f"target of {target_bits:g} bits/weight is not below the raw size ({raw_all:g} "
                                    "bits/weight); store losslessly instead")
    fixed_bits = size(fixed) + float(extra_bits)
    side = (fixed_bits + alloc.SIDE_BITS * len(models)) / n
    if target_bits <= side:
        raise alloc.AllocationError(f"target of {target_bits:g} bits/weight is not above the side information "
                                    f"({side:.4f} bits/weight for {len(names)} tensors)")
    if not models:
        return _met(fixed, fixed_bits / n, target_bits, names, n)
    n_rest = sum(tm.n for tm in models)
    aim = (target_bits * n - fixed_bits) / n_rest
    alloc.check_target(models, aim)
    raw = sum(tm.n * tm.dtype_bits for tm in models) / n_rest
    best = None
    for i in range(ROUNDS):
        a = alloc.allocate(models, aim, tensors=tensors, calibrate=2 if i == 0 else 0)
        steps = {**fixed, **{tm.name: quant.check_step(max(float(a.steps[tm.name]), floor[tm.name]), tm.name)
                             for tm in models}}
        got = (fixed_bits + size({tm.name: steps[tm.name] for tm in models})) / n
        if best is None or abs(got - target_bits) < abs(best[1] - target_bits):
            best = (steps, got)
        if abs(got / target_bits - 1.0) <= TOLERANCE:
            break
        nxt = aim * (target_bits * n - fixed_bits) / (got * n - fixed_bits)
        aim = min(max(nxt, 0.5 * aim), 2.0 * aim, raw * 0.999)
        try:
            alloc.check_target(models, aim)
        except alloc.AllocationError:
            break
    if abs(best[1] / target_bits - 1.0) > TOLERANCE:
        best = _rescaled(best, target_bits, floor, lambda st: (fixed_bits + size(st)) / n)
    if best[1] < target_bits * 0.99 and any(best[0][k] <= floor[k] for k in floor):
        most = (fixed_bits + size({k: quant.check_step(floor[k], k) for k in floor})) / n
        raise alloc.AllocationError(
            f"target of {target_bits:g} bits/weight is above what quantized coding stores ({most:.2f} bits/weight at "
            f"the finest steps a {rans.NSYM_MAX:,}-symbol rANS alphabet allows); store losslessly instead")
    if trellis:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            def tsize(st: Mapping[str, float]) -> float:  # tensors loaded here, ``jobs`` at a time, sized in threads
                items, total = list(st.items()), 0.0
                for a in range(0, len(items), max(1, jobs)):
                    part = [(tensors[k], s, k) for k, s in items[a:a + max(1, jobs)]]
                    total += sum(pool.map(lambda x: trellis_bits(x[0], x[1], coder=coder, gg_fit=gg_fit, name=x[2],
                                                                 chunk_values=chunk_values), part))
                return total

            fixed_t = tsize(fixed) + float(extra_bits)

            def bits_of(st: dict[str, float]) -> float:
                return (fixed_t + tsize({k: st[k] for k in floor})) / n

            best = _rescaled((best[0], bits_of(best[0])), target_bits, floor, bits_of)
    return _met(*best, target_bits, names, n)


def _rescaled(best: tuple[dict[str, float], float], target_bits: float, floor: Mapping[str, float],
              bits_of: Callable[[dict[str, float]], float]) -> tuple[dict[str, float], float]:
    """Scale the steps of ``names`` by one factor until ``bits_of`` meets the target (secant on log2 of the
    factor, starting from about -1 bit/weight per doubling). The allocation jumps where a tensor's best step
    leaps between two rates (a small tensor dropped to rate ~0): a common factor moves the size continuously."""
    steps, got = best
    x0, y0, x1 = 0.0, got, got - target_bits
    for _ in range(4):
        trial = {**steps, **{k: quant.check_step(max(steps[k] * 2.0**x1, f), k) for k, f in floor.items()}}
        y1 = bits_of(trial)
        if abs(y1 - target_bits) < abs(best[1] - target_bits):
            best = (trial, y1)
        if abs(y1 / target_bits - 1.0) <= TOLERANCE or y1 == y0:
            break
        x0, y0, x1 = x1, y1, x1 - (y1 - target_bits) * (x1 - x0) / (y1 - y0)
    return best


def _met(steps: dict[str, float], got: float, target_bits: float, names: list[str], n: int) -> tuple[dict, dict]:
    if abs(got / target_bits - 1.0) > 0.01:
        raise alloc.AllocationError(
            f"target of {target_bits:g} bits/weight cannot be met: the closest allocation stores {got:.4f} bits/weight "
            f"over {len(names)} quantized tensors ({n:,} weights; tables and chunk states included)"
        )
    return steps, {"target_bits": float(target_bits), "bits": got, "weights": n}


SIZE_AIM = 0.996
"""A target size aims the quantized streams at this fraction of what is left, so the file lands within 1 % under."""


def size_to_bits(src, quantized: list[str], aliases: dict, files: Mapping[str, bytes], meta: dict, coder: str,
                  chunk_values: int, target_size: int | str, scales: Mapping[str, ChannelScales]) -> float:
    """Bits/weight over the quantized tensors that make the whole file ``target_size``: the header bounded
    with every written number at its longest (offsets and lengths at most the size), raw tensors and side
    files counted exactly."""
    size = parse_size(target_size)
    worst, longest = -1.2345678901234567e-300, {"offset": size, "length": size, "crc32": 0xFFFFFFFF}
    entries, fixed_bytes, qraw, n = [], 0, 0, 0
    for k in src:
        numel = math.prod(src.shape(k))
        e = {"name": k, "shape": list(src.shape(k)), "dtype": _NAME_OF.get(src.dtype(k), "float64")}
        nbytes = numel * DTYPES[e["dtype"]][0].itemsize
        if k in aliases:
            e.update(encoding="alias", of=aliases[k])
        elif k in quantized:
            n, qraw = n + numel, qraw + nbytes
            e.update(encoding="quantized", coder=coder, step=worst, gg=[worst] * 3,
                     table={"qmin": -quant.Q_LIMIT, "nsym": rans.NSYM_MAX, "prob_bits": rans.PROB_BITS, **longest},
                     chunks=[{"n": chunk_values, "params": {}, "qcrc32": 0xFFFFFFFF, **longest}]
                     * len(chunk_bounds(numel, chunk_values)))
            if k in scales:
                data, params = channels.encode(scales[k])
                e["channel_scales"] = {**params, **longest}
                fixed_bytes += len(data)
        else:
            e.update(encoding="raw", **longest)
            fixed_bytes += nbytes
        entries.append(e)
    head = {"format": FORMAT, "version": VERSION_CHANNELS if scales else VERSION, "data_bytes": size, "metadata": meta, "tensors": entries,
            "files": [{"name": k, **longest} for k in files]}
    fixed_bytes += PREFIX.size + len(json.dumps(head, separators=(",", ":")).encode()) + sum(map(len, files.values()))
    if not n:
        raise ContainerError(f"{src.label}: target size {target_size} given, but no tensor is quantized")
    if size >= fixed_bytes + qraw:
        raise ContainerError(f"target size {target_size} ({size:,} bytes) is not below the raw file "
                             f"({fixed_bytes + qraw:,} bytes); store losslessly or raw instead")
    if SIZE_AIM * size <= fixed_bytes:
        raise ContainerError(f"target size {target_size} ({size:,} bytes) is below the header, raw tensors and side "
                             f"files alone ({fixed_bytes:,} bytes)")
    return 8.0 * (SIZE_AIM * size - fixed_bytes) / n
