"""Writing a ``.ggz`` file: tensors quantized and coded chunk by chunk on a thread pool, streams spooled
to a temporary file, then the header and the data written atomically (docs/format.md)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..io.atomic import atomic_path
from ..io.sources import open_source, side_files
from ..io.tensors import parse_size
from . import channels, fixed, ggmodel, lossless, rans, registry
from . import quantizer as quant
from . import trellis as trellis_codec
from .allocate import AllocationError
from .bits import CodingError
from .channels import ChannelScales
from .header import (
    _NAME_OF,
    CHUNK_MAX,
    CHUNK_VALUES,
    DTYPES,
    FILE_MAX,
    FILES_COUNT_MAX,
    FILES_MAX,
    FLOAT_DTYPES,
    FORMAT,
    HEADER_MAX,
    LOSSLESS_DTYPES,
    MAGIC,
    PIECE_VALUES,
    PREFIX,
    TABLE_CODERS,
    VERSION,
    VERSION_CHANNELS,
    ContainerError,
    check_file_name,
    check_file_set,
    check_name,
    check_shape,
    chunk_bounds,
    crc,
    qcrc,
    stored_bytes,
)
from .histogram import Histogram, histogram
from .target import size_to_bits, target_steps


def default_jobs() -> int:
    """Threads for coding chunks: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def written(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in an OSError raised while writing it (a full disk says which output failed)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or str(path) in str(err):
            raise
        raise OSError(err.errno, f"{path}: cannot write ({err.strerror or err})") from err


def _raw_bytes(t: torch.Tensor) -> bytes:
    name = _NAME_OF[t.dtype]
    c = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        c = c.view(torch.int16)
    elif name == "bool":
        c = c.to(torch.uint8)
    return np.ascontiguousarray(c.numpy(), dtype=DTYPES[name][1]).tobytes()


class _Spool:
    """The data section, written to an anonymous temporary file as streams are produced."""

    def __init__(self, f: BinaryIO):
        self.f, self.size = f, 0

    def put(self, data: bytes | memoryview) -> dict:
        self.f.write(data)
        e = {"offset": self.size, "length": len(data), "crc32": crc(data)}
        self.size += len(data)
        return e


def _merge(hists: list[Histogram]) -> Histogram:
    hists = [h for h in hists if h.symbols.size]
    if len(hists) == 1:
        return hists[0]
    sym, inv = np.unique(np.concatenate([h.symbols for h in hists]), return_inverse=True)
    counts = np.zeros(sym.size, dtype=np.int64)
    np.add.at(counts, inv, np.concatenate([h.counts for h in hists]))
    return Histogram(sym, counts)


def _encode_tensor(t: torch.Tensor, name: str, coder: str, rule: dict, gg_fit: str, pool: ThreadPoolExecutor,
                   spool: _Spool, chunk_values: int) -> dict:
    """Quantize and code one floating tensor in two passes over it, so no whole-tensor integers are held:
    the histogram (piece by piece), then each chunk quantized again and coded (chunks in parallel).
    ``rule["per_row"]`` (with ``rel``) gives each row of a tensor of 2+ dimensions its own step."""
    e: dict = {"encoding": "quantized", "coder": coder}
    flat = t.detach().reshape(-1)
    bounds = chunk_bounds(flat.numel(), chunk_values)
    if rule.get("per_row") and t.dim() >= 2:
        rows = quant.row_steps_for_rel_error(t, rule["rel"], name=name)
        data, params = fixed.encode(quant.row_step_patterns(rows))
        e["row_steps"] = {**params, **spool.put(data)}
        row_steps, row_len = torch.from_numpy(rows.astype(np.float64)), flat.numel() // t.shape[0]
    else:
        e["step"] = quant.choose_step(t, name=name, step=rule["step"], bits=rule["bits"], rel=rule["rel"])

    def quantized(a: int, b: int) -> np.ndarray:  # float64/int64 temporaries of one piece at a time
        q = np.empty(b - a, dtype=np.int32)
        for c, d in chunk_bounds(b - a, PIECE_VALUES):
            s = e["step"] if "step" in e else quant.expand_rows(row_steps, row_len, a + c, a + d)
            q[c:d] = quant.quantize(flat[a + c : a + d], s, name=name).numpy()
        return q

    def quantize_piece(ab: tuple[int, int]) -> Histogram:
        return histogram(quantized(*ab))

    hist = _merge(list(pool.map(quantize_piece, chunk_bounds(flat.numel(), PIECE_VALUES))))
    gg = ggmodel.fit(hist, gg_fit).as_float32()
    e["gg"] = [gg.mu, gg.beta, gg.gamma]
    freqs, qmin = None, 0
    if coder in TABLE_CODERS:
        e["coder"], qmin, freqs = registry.best_rans_table(coder, hist, gg)
        e["table"] = {"qmin": qmin, "nsym": int(freqs.size), "prob_bits": rans.PROB_BITS,
                      **spool.put(rans.pack_freqs(freqs))}

    def encode_chunk(ab: tuple[int, int]) -> dict:
        qc = quantized(*ab)
        if freqs is not None:
            data, params = rans.encode(qc - np.int32(qmin), freqs), {}
        else:
            data, params = registry.encode(coder, qc, gg)
        return {"n": ab[1] - ab[0], "params": params, "qcrc32": qcrc(qc), "data": data}

    e["chunks"] = []
    for c in pool.map(encode_chunk, bounds):
        c.update(spool.put(c.pop("data")))
        e["chunks"].append(c)
    return e


def _encode_lossless(t: torch.Tensor, dtype: str, pool: ThreadPoolExecutor, spool: _Spool, chunk_values: int) -> dict:
    """Code a bf16/fp16/fp32 tensor bit-exactly (:mod:`ggprior.codec.lossless`), chunk by chunk in parallel."""
    flat = t.detach().to("cpu").reshape(-1)

    def encode_chunk(ab: tuple[int, int]) -> tuple[int, bytes]:
        return ab[1] - ab[0], lossless.encode_tensor(flat[ab[0] : ab[1]].contiguous(), dtype)

    chunks = []
    for n, data in pool.map(encode_chunk, chunk_bounds(flat.numel(), chunk_values)):
        chunks.append({"n": n, **spool.put(data)})
    return {"encoding": "lossless", "chunks": chunks}


def _encode_trellis(t: torch.Tensor, name: str, rule: dict, coder: str, gg_fit: str, pool: ThreadPoolExecutor,
                    spool: _Spool, chunk_values: int) -> dict:
    """Code one floating tensor by dependent quantization at ``STEP_RATIO`` times the rule's step (chunks in
    parallel), or by the scalar quantizer at the rule's step (about the same MSE) where that stream is smaller:
    a small tensor, whose two tables per chunk cost more than the trellis saves."""
    s = quant.choose_step(t, name=name, step=rule["step"], bits=rule["bits"], rel=rule["rel"])
    step, states = trellis_codec.file_step(s, name), trellis_codec.FILE_STATES
    chunks = trellis_codec.encode_tensor(t, step, states, chunk_values, pool, name)
    buf = _Spool(io.BytesIO())
    e = _encode_tensor(t, name, coder, {"step": s, "bits": None, "rel": None}, gg_fit, pool, buf, chunk_values)
    if stored_bytes(e) < sum(len(d) for _, d in chunks):
        data = buf.f.getvalue()

        def put(c: dict) -> dict:  # a stream of the scalar encoding, moved into the file's data section
            return {**c, **spool.put(data[c["offset"]:c["offset"] + c["length"]])}

        return {**e, **({"table": put(e["table"])} if "table" in e else {}), "chunks": [put(c) for c in e["chunks"]]}
    return {"encoding": "trellis", "step": step, "states": states, "chunks": [{"n": n, **spool.put(d)} for n, d in chunks]}


def _step_rules(src, names: list[str], rule: dict, target_bits: float | None, coder: str, gg_fit: str,
                weights: Mapping[str, float] | None, chunk_values: int, trellis: bool, jobs: int,
                extra_bits: float = 0.0) -> dict[str, dict]:
    """Each quantized tensor's step rule: the common ``rule``, or the steps of a ``target_bits`` allocation
    (``extra_bits``: side information stored with the tensors besides their streams, the channel scales)."""
    if target_bits is None:
        if weights is not None:
            raise ContainerError("sensitivity weights are used only with target_bits")
        return {k: rule for k in names}
    if not names:
        raise ContainerError(f"{src.label}: target_bits given, but no tensor is quantized")
    steps, _ = target_steps(src, names, target_bits, coder=coder, gg_fit=gg_fit, weights=weights,
                            chunk_values=chunk_values, trellis=trellis, jobs=jobs, extra_bits=extra_bits)
    return {k: {"step": s, "bits": None, "rel": None} for k, s in steps.items()}


def _put_scales(e: dict, scales: ChannelScales | None, spool: _Spool) -> None:
    if scales is not None:
        data, params = channels.encode(scales)
        e["channel_scales"] = {**params, **spool.put(data)}


def save_compressed(
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    coder: str = "ans",
    step: float | None = None,
    bits: int | None = None,
    rel_error: float | None = None,
    include: str = "all",
    gg_fit: str = "moment",
    metadata: Mapping[str, str] | None = None,
    files: Mapping[str, bytes] | None = None,
    jobs: int | None = None,
    chunk_values: int = CHUNK_VALUES,
    progress: bool = False,
    lossless: bool = False,
    target_bits: float | None = None,
    weights: Mapping[str, float] | None = None,
    per_row: bool = False,
    target_size: int | str | None = None,
    trellis: bool = False,
    channel_scales: Mapping[str, ChannelScales] | None = None,
) -> dict:
    """Quantize and entropy-code a model into a ``.ggz`` file (format version 2, written atomically; version 3
    with channel scales).

    ``source`` is anything :func:`ggprior.io.open_source` accepts, a transformers model included:
    a folder's small non-weight files (config, tokenizer, ...) or a model's config are stored too
    (``files`` overrides them). Tensors sharing memory (tied weights) are stored once. Exactly one
    of ``step``, ``bits`` (per-tensor symmetric FL step) or ``rel_error`` selects the step; none
    means ``rel_error=DEFAULT_REL_ERROR`` (0.005). ``include`` picks the quantized floating tensors (``"all"`` or
    ``"matrices"``); other tensors are stored raw. ``coder`` is one of ``fl, eg, huffman, ans,
    ans-hist``. ``jobs`` threads code the chunks (default: every core). Returns the header (with
    ``file_bytes``).

    ``lossless=True`` stores every bf16/fp16/fp32 tensor bit-exactly (NaN, Inf, subnormals and
    -0.0 included) with :mod:`ggprior.codec.lossless` (float64 raw); no step rule may be given.
    ``target_bits=B`` chooses each quantized tensor's step by the GG-model bit allocation so the
    quantized tensors take ``B`` bits/weight in the file (:mod:`ggprior.codec.target`; ``weights``:
    optional sensitivity weight per tensor name, default uniform); the ``ans`` coders only.
    ``target_size`` (bytes, or ``"300MB"``, ``"1.5GiB"``) does the same for the whole file (header,
    raw tensors, side files and tables included), which ends within 1 % under the size.
    ``per_row=True`` gives every row (dim 0) of each quantized tensor of 2+ dimensions its own
    step with relative RMS error ``rel_error`` on that row (stored as bfloat16 patterns).
    ``trellis=True`` codes the quantized tensors by 8-state dependent quantization (:mod:`ggprior.codec.trellis`)
    at ``trellis.STEP_RATIO`` times the rule's step (about the scalar quantizer's MSE, ~0.17 bit/weight fewer),
    each tensor falling back to the scalar ``coder`` at the rule's step where that stream is smaller; with a
    target, the steps are rescaled to the trellis sizes; not with ``per_row`` or ``lossless``.
    ``channel_scales`` (name -> :class:`~ggprior.codec.channels.ChannelScales`, from
    ``calibration_weights(channels=True)``) shape a quantized tensor's step per row and column: the tensor
    divided by its scales is what the step rule, the allocation and the coder see, and its codes are stored
    (a few bits per row and column; scales of tensors stored raw or as aliases are not used); not with
    ``per_row`` or ``lossless``.
    """
    coder = registry.check_coder(coder)
    modes = [k for k, v in (("lossless", lossless), ("target_bits", target_bits is not None),
                            ("target_size", target_size is not None)) if v]
    if len(modes) > 1:
        raise ContainerError(f"{modes[0]} and {modes[1]} exclude each other")
    if modes and (step is not None or bits is not None or rel_error is not None or per_row):
        raise ContainerError(f"{modes[0]} takes no step, bits, rel_error or per_row")
    if channel_scales and (lossless or per_row):
        raise ContainerError(f"channel_scales take a quantized mode, not {'lossless' if lossless else 'per_row'}")
    if trellis and (lossless or per_row):
        raise ContainerError(f"trellis takes step, bits, rel_error or a target, not {'lossless' if lossless else 'per_row'}")
    if per_row and (step is not None or bits is not None):
        raise ContainerError("per_row takes rel_error (default 0.005), not step or bits")
    step, bits, rel_error = (None, None, None) if modes else quant.resolve_rule(step, bits, rel_error)
    rule = {"step": step, "bits": bits, "rel": rel_error, "per_row": per_row}
    if not 1 <= int(chunk_values) <= CHUNK_MAX:
        raise ContainerError(f"chunk_values must lie in [1, {CHUNK_MAX}], got {chunk_values}")
    src = open_source(source)
    where = src.label
    if files is None:
        files, skipped = side_files(source, FILE_MAX, max_count=FILES_COUNT_MAX, max_total=FILES_MAX)
    else:
        skipped = []
    check_file_set([check_file_name(fname, where) for fname in files], where)
    for fname, data in files.items():
        if len(data) > FILE_MAX:
            raise ContainerError(f"{where}: file {fname!r} of {len(data)} bytes exceeds the {FILE_MAX}-byte cap")
    if sum(len(d) for d in files.values()) > FILES_MAX:
        raise ContainerError(f"{where}: the model's side files exceed {FILES_MAX} bytes together")
    aliases = src.aliases()
    quantized = [] if lossless else [k for k in src if k not in aliases and _NAME_OF.get(src.dtype(k)) in FLOAT_DTYPES
                                     and math.prod(src.shape(k)) and quant.is_included(k, tuple(src.shape(k)), include)]
    try:
        scales = channels.checked(src, quantized, channel_scales or {})
    except CodingError as err:
        raise ContainerError(str(err)) from err
    qsrc = channels.ScaledSource(src, scales)
    meta = {"source": where, "coder": "lossless" if lossless else "trellis" if trellis else coder, "include": include,
            "step_rule": "lossless" if lossless else f"target_size={target_size}" if target_size is not None
            else f"target_bits={target_bits:g}" if target_bits is not None else quant.step_rule(step, bits, rel_error, per_row)}
    if skipped:
        meta["files_skipped"] = ", ".join(skipped)
    if scales:
        meta["channel_scales"] = f"{len(scales)} tensors"
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    try:
        if target_size is not None:
            target_bits = size_to_bits(src, quantized, aliases, files, meta, coder, chunk_values, target_size,
                                        scales)
        rules = _step_rules(qsrc, quantized, rule, target_bits, coder, gg_fit, weights, chunk_values, trellis,
                            jobs or default_jobs(), sum(8.0 * len(channels.encode(c)[0]) for c in scales.values()))
    except (AllocationError, CodingError) as err:
        if target_size is None:
            raise
        raise ContainerError(f"target size {target_size} cannot be met: {err}") from err
    entries: list[dict] = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written(path), tempfile.TemporaryFile(dir=path.parent) as f, ThreadPoolExecutor(jobs or default_jobs()) as pool:
        spool = _Spool(f)
        for name in tqdm(list(src), desc="compress", disable=not progress, leave=False):
            check_name(name, where)
            tag = f"{where}: tensor {name!r}"
            shape = list(src.shape(name))
            dtype = _NAME_OF.get(src.dtype(name))
            if dtype is None:
                raise ContainerError(f"{tag}: unsupported dtype {src.dtype(name)}")
            numel = check_shape(shape, tag)
            e: dict = {"name": name, "shape": shape, "dtype": dtype}
            if name in aliases:
                e.update(encoding="alias", of=aliases[name])
            elif lossless and dtype in LOSSLESS_DTYPES and numel:
                try:
                    e.update(_encode_lossless(src[name], dtype, pool, spool, chunk_values))
                except CodingError as err:
                    raise ContainerError(f"{tag}: {err}") from err
            elif name in rules and trellis:
                _put_scales(e, scales.get(name), spool)
                try:
                    e.update(_encode_trellis(qsrc[name], name, rules[name], coder, gg_fit, pool, spool, chunk_values))
                except (CodingError, quant.QuantError) as err:
                    raise ContainerError(f"{tag}: {err}") from err
            elif name in rules:
                _put_scales(e, scales.get(name), spool)
                try:
                    e.update(_encode_tensor(qsrc[name], name, coder, rules[name], gg_fit, pool, spool, chunk_values))
                except CodingError as err:
                    raise ContainerError(f"{tag}: {err}") from err
            else:
                e.update(encoding="raw", **spool.put(_raw_bytes(src[name])))
            entries.append(e)
        stored = [{"name": k, **spool.put(v)} for k, v in files.items()]
        header = {"format": FORMAT, "version": VERSION_CHANNELS if scales else VERSION, "data_bytes": spool.size, "metadata": meta,
                  "tensors": entries, "files": stored}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        if len(hbytes) > HEADER_MAX:
            raise ContainerError(f"{path}: header of {len(hbytes)} bytes exceeds the {HEADER_MAX}-byte cap")
        if target_size is not None and PREFIX.size + len(hbytes) + spool.size > parse_size(target_size):
            raise ContainerError(f"{path}: target size {target_size} not met: the file would take "
                                 f"{PREFIX.size + len(hbytes) + spool.size:,} bytes (nothing written)")
        f.seek(0)
        with written(path), atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(PREFIX.pack(MAGIC, header["version"], len(hbytes), crc(hbytes)))
            out.write(hbytes)
            shutil.copyfileobj(f, out, 1 << 22)
    header["file_bytes"] = PREFIX.size + len(hbytes) + spool.size
    return header
