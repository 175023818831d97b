"""The compressed model file (``.ggz``): quantized, entropy-coded tensors behind a JSON header.

Layout (all integers little-endian; full description in docs/format.md)::

    magic      8 bytes   b"GGZ\\x00\\r\\n\\x1a\\n"
    version    u32       2 (version 1 files are still read)
    hlen       u32       length of the JSON header in bytes (<= HEADER_MAX)
    hcrc       u32       CRC-32 of the header bytes
    header     hlen bytes of UTF-8 JSON
    data       the streams; header["data_bytes"] bytes, then end of file

Version 2 codes each quantized tensor as independent chunks of at most ``CHUNK_MAX`` values
(encoded and decoded in parallel threads), stores the rANS frequency table of the ``ans`` coders
in the file (integer-exact: nothing is recomputed from floats at read time), stores a tensor that
shares memory with an earlier one once (an ``alias`` entry) and keeps the small non-weight files
of a model folder (config, tokenizer, ...). Every stream has a CRC-32; quantized chunks also
the CRC-32 of their decoded integers.

Reading is defensive: the prefix, the header checksum, every field's type and range, and
every stream's bounds (the streams tile the data section exactly) are checked before anything
is allocated; each coder bounds the number of values by its stream length; the decoded size is
capped (``max_bytes``). Any damage gives a :class:`ContainerError` naming the file and the
tensor. Writes are atomic (:func:`ggprior.io.atomic_path`), and memory stays bounded by the
largest tensor: streams are spooled to a temporary file, tensors are quantized and dequantized
chunk by chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import channels, fixed, lossless, rans, registry, trellis
from . import quantizer as quant
from .bits import CodingError
from .ggmodel import GGParams
from .header import (  # noqa: F401  (the format's names, re-exported: container is the .ggz module)
    CHUNK_MAX,
    CHUNK_VALUES,
    DTYPES,
    FILE_MAX,
    FLOAT_DTYPES,
    FORMAT,
    HEADER_MAX,
    MAGIC,
    PIECE_VALUES,
    PREFIX,
    TABLE_CODERS,
    VERSION,
    VERSIONS,
    ContainerError,
    chunk_bounds,
    crc,
    decoded_bytes,
    parse,
    qcrc,
    stored_bytes,
)
from .writer import default_jobs, save_compressed, written  # noqa: F401


def default_max_bytes() -> int:
    """The default cap on decoded bytes: the machine's physical memory (a larger model cannot be loaded anyway)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 36


def _in_range(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 values cast to ``dtype``, a value past its range decoding to its maximum, not inf."""
    return v.clamp_(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)


def _from_raw(buf: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    a = np.frombuffer(buf, dtype=DTYPES[dtype][1]).copy()
    t = torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    elif dtype == "bool":
        t = t.to(torch.bool)
    return t.reshape(shape)


class Reader:
    """An open .ggz file whose prefix and header have been validated; streams are read on demand.

    ``max_bytes`` caps the decoded size of the file (default :func:`default_max_bytes`); ``jobs``
    threads decode the chunks of a tensor.
    """

    def __init__(self, path: str | os.PathLike, *, max_bytes: int | None = None, jobs: int | None = None):
        self.path = Path(path)
        where = str(self.path)
        try:
            self._f = open(self.path, "rb")
        except OSError as err:
            raise ContainerError(f"{where}: cannot open ({err.strerror})") from err
        try:
            size = os.fstat(self._f.fileno()).st_size
            prefix = self._f.read(PREFIX.size)
            hlen = PREFIX.unpack(prefix)[2] if len(prefix) == PREFIX.size else 0
            head = prefix + (self._f.read(hlen) if hlen <= min(HEADER_MAX, size) else b"")
            self.header, self.start = parse(memoryview(head), size, where)
            cap = default_max_bytes() if max_bytes is None else max_bytes
            need = decoded_bytes(self.header)
            if need > cap:
                raise ContainerError(f"{where}: decodes to {need:,} bytes, more than max_bytes = {cap:,}")
        except BaseException:
            self._f.close()
            raise
        self.version = self.header["version"]
        self.entries = {e["name"]: e for e in self.header["tensors"]}
        self._pool = ThreadPoolExecutor(jobs or default_jobs())

    def close(self) -> None:
        self._pool.shutdown()
        self._f.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, e: dict, name: str) -> bytes:
        """The bytes of one stream (thread-safe), checked against its CRC-32."""
        buf = os.pread(self._f.fileno(), e["length"], self.start + e["offset"]) if e["length"] else b""
        if len(buf) != e["length"] or crc(buf) != e["crc32"]:
            raise ContainerError(f"{self.path}: {name}: stream checksum mismatch (damaged data)")
        return buf

    def files(self) -> dict[str, bytes]:
        """The stored side files (config, tokenizer, ...)."""
        return {f["name"]: self.stream(f, f"file {f['name']!r}") for f in self.header["files"]}

    def _checked(self, q: np.ndarray, want: int, tag: str) -> np.ndarray:
        if q.size and (int(q.min()) < -quant.Q_LIMIT or int(q.max()) > quant.Q_LIMIT):
            raise ContainerError(f"{tag}: decoded integers exceed +-{quant.Q_LIMIT}")
        if qcrc(q) != want:
            raise ContainerError(f"{tag}: decoded integers do not match their checksum")
        return q

    def _chunk_decoder(self, e: dict) -> tuple[list[tuple[int, int]], Callable[[int], np.ndarray]]:
        """The value ranges of a quantized entry's chunks and a function decoding chunk i (verified)."""
        tag = f"{self.path}: tensor {e['name']!r}"
        if self.version == 1:
            gg = GGParams(*e["gg"]) if e["coder"] == "ans" else None
            one = {"n": math.prod(e["shape"]), "params": e["params"], "qcrc32": e["qcrc32"], "v1": e}
            chunks = [one]
        else:
            chunks, gg = e["chunks"], None
        freqs, qmin = None, 0
        if self.version > 1 and e["coder"] in TABLE_CODERS:
            t = e["table"]
            try:
                freqs, used = rans.unpack_freqs(self.stream(t, f"tensor {e['name']!r} table"), t["nsym"], t["prob_bits"])
            except CodingError as err:
                raise ContainerError(f"{tag}: {err}") from err
            if used != t["length"]:
                raise ContainerError(f"{tag}: frequency table of {used} bytes in a {t['length']}-byte stream")
            qmin = t["qmin"]
        bounds, a = [], 0
        for c in chunks:
            bounds.append((a, a + c["n"]))
            a += c["n"]

        def decode(i: int) -> np.ndarray:
            c = chunks[i]
            data = self.stream(c.get("v1", c), f"tensor {e['name']!r}")
            try:
                if freqs is not None:
                    q = rans.decode(data, freqs, c["n"])
                    q += np.int32(qmin)
                else:
                    q = registry.decode(e["coder"], data, c["n"], c["params"], gg)
            except CodingError as err:
                raise ContainerError(f"{tag}: {err}") from err
            return self._checked(q, c["qcrc32"], tag)

        return bounds, decode

    def integers(self, name: str) -> np.ndarray:
        """The decoded quantized integers of a quantized tensor (int32, flat), verified."""
        e = self.entries[name]
        bounds, decode = self._chunk_decoder(e)
        out = np.empty(bounds[-1][1] if bounds else 0, dtype=np.int32)

        def put(i: int) -> None:
            out[bounds[i][0] : bounds[i][1]] = decode(i)

        list(self._pool.map(put, range(len(bounds))))
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, decoded in its dtype; an alias decodes its target. Chunks are dequantized one by one."""
        e = self.entries[name]
        if e["encoding"] == "alias":
            e = self.entries[e["of"]]
        shape = tuple(e["shape"])
        if e["encoding"] == "raw":
            return _from_raw(self.stream(e, f"tensor {e['name']!r}"), e["dtype"], shape)
        if e["encoding"] == "lossless":
            return self._lossless(e).reshape(shape)
        if e["encoding"] == "trellis":
            return self._trellis(e).reshape(shape)
        dtype = DTYPES[e["dtype"]][0]
        out = torch.empty(math.prod(shape), dtype=dtype)
        bounds, decode = self._chunk_decoder(e)
        rows = self.row_steps(e)
        row_len = out.numel() // shape[0] if rows is not None else 0
        factors = self.channel_factors(e)

        def put(i: int) -> None:  # dequantized a piece at a time: float64 temporaries of one piece only
            q = torch.from_numpy(decode(i))
            for a, b in chunk_bounds(q.numel(), PIECE_VALUES):
                lo, hi = bounds[i][0] + a, bounds[i][0] + b
                s = e["step"] if rows is None else quant.expand_rows(rows, row_len, lo, hi)
                if factors is None:
                    out[lo:hi] = quant.dequantize(q[a:b], s, dtype)
                else:
                    out[lo:hi] = _in_range(quant.dequantize(q[a:b], channels.expand(lo, hi - lo, factors, s),
                                                            torch.float64), dtype)

        list(self._pool.map(put, range(len(bounds))))
        return out.reshape(shape)

    def row_steps(self, e: dict) -> torch.Tensor | None:
        """A quantized entry's per-row steps (float64, one per row), or None when it has one ``step``."""
        r = e.get("row_steps")
        if r is None or self.version == 1:
            return None
        try:
            p = fixed.decode(self.stream(r, f"tensor {e['name']!r} row steps"), e["shape"][0], r["qmin"], r["width"])
            return torch.from_numpy(quant.row_steps_from_patterns(p, "row steps").astype(np.float64))
        except (CodingError, quant.QuantError) as err:
            raise ContainerError(f"{self.path}: tensor {e['name']!r}: {err}") from err

    def channel_factors(self, e: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A quantized or trellis entry's row and column step factors (float64), or None without channel scales."""
        r = e.get("channel_scales")
        if r is None:
            return None
        rows, cols = e["shape"][0], math.prod(e["shape"][1:])
        try:
            return channels.decode(self.stream(r, f"tensor {e['name']!r} channel scales"), rows, cols, r["qmin"],
                                   r["width"]).factors()
        except CodingError as err:
            raise ContainerError(f"{self.path}: tensor {e['name']!r}: {err}") from err

    def _lossless(self, e: dict) -> torch.Tensor:
        """A lossless entry's exact bit patterns, chunks decoded in parallel, viewed as its dtype (flat)."""
        tag = f"{self.path}: tensor {e['name']!r}"
        wide = e["dtype"] == "float32"
        out = np.empty(math.prod(e["shape"]), dtype=np.uint32 if wide else np.uint16)
        starts = np.cumsum([0] + [c["n"] for c in e["chunks"]])

        def put(i: int) -> None:
            c = e["chunks"][i]
            data = self.stream(c, f"tensor {e['name']!r}")
            try:
                out[starts[i] : starts[i + 1]] = lossless.decode_tensor(data, e["dtype"], c["n"])
            except CodingError as err:
                raise ContainerError(f"{tag}: {err}") from err

        list(self._pool.map(put, range(len(e["chunks"]))))
        return torch.from_numpy(out.view(np.int32 if wide else np.int16)).view(DTYPES[e["dtype"]][0])

    def _trellis(self, e: dict) -> torch.Tensor:
        """A trellis entry's values in its dtype (flat), chunks decoded in parallel."""
        tag = f"{self.path}: tensor {e['name']!r}"
        out = torch.empty(math.prod(e["shape"]), dtype=DTYPES[e["dtype"]][0])
        starts = np.cumsum([0] + [c["n"] for c in e["chunks"]])
        factors = self.channel_factors(e)

        def put(i: int) -> None:
            c = e["chunks"][i]
            try:
                dq = trellis.decode(self.stream(c, f"tensor {e['name']!r}"), c["n"], "trellis")
            except CodingError as err:
                raise ContainerError(f"{tag}: {err}") from err
            if dq.step != e["step"] or dq.n_states != e["states"]:
                raise ContainerError(f"{tag}: chunk {i} has step {dq.step!r} and {dq.n_states} states, the entry "
                                     f"{e['step']!r} and {e['states']}")
            v = torch.from_numpy(dq.values())
            if factors is not None:
                v = v * channels.expand(int(starts[i]), v.numel(), factors)
            out[starts[i] : starts[i + 1]] = _in_range(v, out.dtype)

        list(self._pool.map(put, range(len(e["chunks"]))))
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order; an alias yields the very tensor object of its target."""
        done: dict[str, torch.Tensor] = {}
        for e in self.header["tensors"]:
            if e["encoding"] == "alias":
                yield e["name"], done[e["of"]]
            else:
                done[e["name"]] = self.tensor(e["name"])
                yield e["name"], done[e["name"]]


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of a .ggz file (streams are not read)."""
    with Reader(path, max_bytes=1 << 62, jobs=1) as r:
        return r.header


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Names of the model's state dict that share memory, grouped (tied weights)."""
    groups: dict[tuple, set[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            groups.setdefault((t.device.type, t.untyped_storage().data_ptr(), t.storage_offset()), set()).add(k)
    return [g for g in groups.values() if len(g) > 1]


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` where a missing name tied to a loaded one is not missing
    (as ``safetensors.torch.load_model``). Returns (missing, unexpected); raises RuntimeError if strict."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    tied = [g for g in _tied_groups(model) if g & set(state)]
    missing = [k for k in missing if not any(k in g for g in tied)]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: "
                           f"missing keys {missing}, unexpected keys {unexpected}")
    return missing, unexpected


def load_compressed(
    path: str | os.PathLike, *, model: nn.Module | None = None, strict: bool = True,
    device: torch.device | str | None = None, max_bytes: int | None = None, jobs: int | None = None,
) -> dict[str, torch.Tensor] | tuple[list[str], list[str]]:
    """Decode a .ggz file into a state dict (dequantized tensors in their original dtypes; an alias
    is the same tensor object as its target).

    With ``model``, fill it in place instead (``load_state_dict`` strictness, tied weights as
    ``safetensors.torch.load_model``) and return (missing, unexpected). ``max_bytes`` caps the
    decoded size (default: physical memory). Raises :class:`ContainerError` naming the file and
    tensor on any damage.
    """
    with Reader(path, max_bytes=max_bytes, jobs=jobs) as r:
        moved: dict[int, torch.Tensor] = {}  # an alias stays the same tensor on the device too
        sd = {k: t if device is None else moved.setdefault(id(t), t.to(device)) for k, t in r.tensors()}
    if model is not None:
        return load_into(model, sd, strict=strict)
    return sd


def load_integers(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, float | torch.Tensor]]:
    """The quantized tensors of a .ggz file as ``name -> (int32 integers in shape, step)``; the step of a
    per-row entry is a float64 tensor of one step per row, that of an entry with channel scales a float64
    tensor of the tensor's shape (``step u_i v_j``), so ``q * step`` is the decoded tensor either way."""
    with Reader(path) as r:
        return {e["name"]: (torch.from_numpy(r.integers(e["name"])).reshape(tuple(e["shape"])), _steps(r, e))
                for e in r.header["tensors"] if e["encoding"] == "quantized"}


def _steps(r: Reader, e: dict) -> float | torch.Tensor:
    if (f := r.channel_factors(e)) is not None:
        return (e["step"] * f[0][:, None] * f[1][None, :]).reshape(tuple(e["shape"]))
    return e["step"] if "step" in e else r.row_steps(e)


def inspect_rows(path: str | os.PathLike) -> list[dict]:
    """One row per tensor: shape, dtype, encoding, coder, bytes, bits/weight, step, GG parameters."""
    rows = []
    for e in read_header(path)["tensors"]:
        numel = math.prod(e["shape"])
        nbytes = stored_bytes(e)
        coder = e.get("coder", e["encoding"]) if e["encoding"] != "alias" else f"alias of {e['of']}"
        row = {"name": e["name"], "shape": "x".join(map(str, e["shape"])) or "scalar", "dtype": e["dtype"],
               "coder": coder, "bytes": nbytes, "bits_per_weight": 8 * nbytes / numel if numel else 0.0}
        if e["encoding"] == "quantized" and "row_steps" in e:  # the smallest row step; no one scale for mu, beta
            row.update(coder=f"{coder} per-row", step=float(quant.row_steps_from_patterns([e["row_steps"]["qmin"]])[0]))
            if "gg" in e:
                row["gg_gamma"] = e["gg"][2]
        elif e["encoding"] == "trellis":
            row.update(coder=f"trellis-{e['states']}", step=e["step"])
        elif e["encoding"] == "quantized" and "channel_scales" in e:  # the step before the channel factors
            row["step"] = e["step"]
            if "gg" in e:
                row["gg_gamma"] = e["gg"][2]
        elif e["encoding"] == "quantized":
            row["step"] = e["step"]
            if "gg" in e:
                mu, beta, gamma = e["gg"]
                row.update(gg_mu=mu * e["step"], gg_beta=beta * e["step"], gg_gamma=gamma)
        if "channel_scales" in e:
            row["coder"] += " channel-scaled"
        rows.append(row)
    return rows
