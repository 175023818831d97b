"""The compressed model file (``.ggz``): quantized, entropy-coded tensors behind a JSON header.

Layout (all integers little-endian; full description in docs/format.md)::

    magic      8 bytes   b"GGZ\\x00\\r\\n\\x1a\\n"
    version    u32       1
    hlen       u32       length of the JSON header in bytes (<= HEADER_MAX)
    hcrc       u32       CRC-32 of the header bytes
    header     hlen bytes of UTF-8 JSON
    data       the streams; header["data_bytes"] bytes, then end of file

Each tensor entry of the header gives its name, shape, dtype, the byte range of its stream
inside ``data`` (``offset``, ``length``) and the stream's CRC-32; quantized tensors add the
step, the coder, the coder's integer parameters, the fitted GG parameters in step units
(the model of ``ans``; informative for the other coders) and the CRC-32
of the decoded integers (``qcrc32``). Tensors not quantized are stored raw (little-endian,
like safetensors).

Reading is defensive: the prefix, the header checksum, every field's type and range, and
every stream's bounds (inside the data section, no overlap, file size exact) are checked
before anything is allocated; each coder bounds the number of values by its stream length;
streams are checksummed before and after decoding. Any damage gives a :class:`ContainerError`
naming the file and the tensor. Writes are atomic (:func:`ggprior.io.atomic_path`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..io.atomic import atomic_path
from ..io.sources import open_source
from . import quantizer as quant
from . import registry
from .bits import CodingError
from .ggmodel import GGParams

MAGIC = b"GGZ\x00\r\n\x1a\n"
VERSION = 1
PREFIX = struct.Struct("<8sIII")
HEADER_MAX = 16 << 20
MAX_NDIM = 8
MAX_NUMEL = 1 << 40
FORMAT = "ggprior.ggz"

DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "<f8"), "float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"), "int64": (torch.int64, "<i8"), "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"), "int8": (torch.int8, "<i1"), "uint8": (torch.uint8, "<u1"),
    "bool": (torch.bool, "<u1"),
}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class ContainerError(ValueError):
    """A .ggz file is damaged, truncated, or not a .ggz file; or a model cannot be written."""


def _crc(data: bytes | memoryview | np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _qcrc(q: np.ndarray) -> int:
    return _crc(np.ascontiguousarray(q, dtype="<i4").view(np.uint8))


def _raw_bytes(t: torch.Tensor) -> bytes:
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise ContainerError(f"unsupported dtype {t.dtype}")
    c = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        c = c.view(torch.int16)
    elif name == "bool":
        c = c.to(torch.uint8)
    return np.ascontiguousarray(c.numpy(), dtype=DTYPES[name][1]).tobytes()


def _from_raw(buf: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    tdtype, np_dtype = DTYPES[dtype]
    a = np.frombuffer(buf, dtype=np_dtype).copy()
    t = torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    elif dtype == "bool":
        t = t.to(torch.bool)
    return t.reshape(shape)


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
    progress: bool = False,
) -> dict:
    """Quantize and entropy-code a model into a ``.ggz`` file (written atomically).

    ``source`` is anything :func:`ggprior.io.open_source` accepts. Exactly one of
    ``step``, ``bits`` (per-tensor symmetric FL step) or ``rel_error`` selects the step;
    none means ``bits=10``. ``include`` picks the quantized floating tensors (``"all"`` or
    ``"matrices"``); other tensors are stored raw. ``coder`` is one of
    ``fl, eg, huffman, ans, ans-hist``. Returns the header (with ``file_bytes``).
    """
    coder = registry.check_coder(coder)
    step, bits, rel_error = quant.resolve_rule(step, bits, rel_error)
    src = open_source(source)
    entries: list[dict] = []
    streams: list[bytes] = []
    offset = 0
    for name in tqdm(list(src), desc="compress", disable=not progress, leave=False):
        t = src[name]
        shape = tuple(int(d) for d in t.shape)
        dtype = _NAME_OF.get(t.dtype)
        if dtype is None:
            raise ContainerError(f"{src.label}: tensor {name!r} has unsupported dtype {t.dtype}")
        e: dict = {"name": name, "shape": list(shape), "dtype": dtype}
        if dtype in FLOAT_DTYPES and t.numel() and quant.is_included(name, shape, include):
            qt = quant.quantize_tensor(t, step=step, bits=bits, rel=rel_error, gg_fit=gg_fit, name=name)
            s, q, gg = qt.step, qt.q.cpu().numpy().reshape(-1), qt.gg.as_float32()
            e["gg"] = [gg.mu, gg.beta, gg.gamma]
            try:
                data, params = registry.encode(coder, q, gg)
            except CodingError as err:
                raise ContainerError(f"{src.label}: tensor {name!r}: {err}") from err
            e.update(encoding="quantized", coder=coder, step=s, params=params, qcrc32=_qcrc(q))
        else:
            data = _raw_bytes(t)
            e["encoding"] = "raw"
        e.update(offset=offset, length=len(data), crc32=_crc(data))
        offset += len(data)
        entries.append(e)
        streams.append(data)
    meta = {"source": src.label, "coder": coder, "include": include,
            "step_rule": quant.step_rule(step, bits, rel_error)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    header = {"format": FORMAT, "version": VERSION, "data_bytes": offset, "metadata": meta, "tensors": entries}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    if len(hbytes) > HEADER_MAX:
        raise ContainerError(f"{path}: header of {len(hbytes)} bytes exceeds the {HEADER_MAX}-byte cap")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(PREFIX.pack(MAGIC, VERSION, len(hbytes), _crc(hbytes)))
        f.write(hbytes)
        for d in streams:
            f.write(d)
    header["file_bytes"] = PREFIX.size + len(hbytes) + offset
    return header


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_entry(e: object, i: int, data_bytes: int, where: str) -> dict:
    if not isinstance(e, dict):
        raise ContainerError(f"{where}: tensor entry {i} is not an object")
    name = e.get("name")
    if not isinstance(name, str) or not name:
        raise ContainerError(f"{where}: tensor entry {i} has no valid name")
    tag = f"{where}: tensor {name!r}"
    shape = e.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_NUMEL for d in shape):
        raise ContainerError(f"{tag}: invalid shape {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ContainerError(f"{tag}: {numel} elements exceed the limit of {MAX_NUMEL}")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
        raise ContainerError(f"{tag}: unsupported dtype {e.get('dtype')!r}")
    for k in ("offset", "length", "crc32"):
        if not _is_int(e.get(k)) or e[k] < 0:
            raise ContainerError(f"{tag}: invalid {k} {e.get(k)!r}")
    if e["crc32"] > 0xFFFFFFFF:
        raise ContainerError(f"{tag}: invalid crc32 {e['crc32']!r}")
    if e["offset"] + e["length"] > data_bytes:
        raise ContainerError(f"{tag}: stream [{e['offset']}, +{e['length']}) lies outside the {data_bytes}-byte data")
    enc = e.get("encoding")
    if enc == "raw":
        need = numel * np.dtype(DTYPES[e["dtype"]][1]).itemsize
        if e["length"] != need:
            raise ContainerError(f"{tag}: raw stream has {e['length']} bytes, shape and dtype need {need}")
    elif enc == "quantized":
        if e["dtype"] not in FLOAT_DTYPES:
            raise ContainerError(f"{tag}: quantized tensor with non-float dtype {e['dtype']!r}")
        try:
            e["coder"] = registry.check_coder(e.get("coder", ""))
            quant.check_step(e.get("step") if isinstance(e.get("step"), float) else float("nan"), tag)
        except (CodingError, quant.QuantError) as err:
            raise ContainerError(f"{tag}: {err}") from err
        if not isinstance(e.get("params"), dict):
            raise ContainerError(f"{tag}: missing coder parameters")
        if not _is_int(e.get("qcrc32")) or not 0 <= e["qcrc32"] <= 0xFFFFFFFF:
            raise ContainerError(f"{tag}: invalid qcrc32 {e.get('qcrc32')!r}")
        if e["coder"] == "ans" or "gg" in e:
            gg = e.get("gg")
            if not (isinstance(gg, list) and len(gg) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in gg)
                    and gg[1] > 0 and gg[2] > 0):
                raise ContainerError(f"{tag}: invalid GG parameters {gg!r}")
    else:
        raise ContainerError(f"{tag}: unknown encoding {enc!r}")
    return e


def _parse(mm: memoryview, size: int, where: str) -> tuple[dict, int]:
    """Validate the prefix and header (``mm`` holds at least the prefix and header bytes)."""
    if size < PREFIX.size or len(mm) < PREFIX.size:
        raise ContainerError(f"{where}: {size} bytes is too short for a .ggz file")
    magic, version, hlen, hcrc = PREFIX.unpack(bytes(mm[: PREFIX.size]))
    if magic != MAGIC:
        raise ContainerError(f"{where}: not a .ggz file (bad magic {magic!r})")
    if version != VERSION:
        raise ContainerError(f"{where}: unsupported .ggz version {version} (this reader knows {VERSION})")
    if hlen > HEADER_MAX:
        raise ContainerError(f"{where}: header length {hlen} exceeds the {HEADER_MAX}-byte cap")
    if PREFIX.size + hlen > size or len(mm) < PREFIX.size + hlen:
        raise ContainerError(f"{where}: truncated (header of {hlen} bytes, file of {size})")
    hraw = mm[PREFIX.size : PREFIX.size + hlen]
    if _crc(hraw) != hcrc:
        raise ContainerError(f"{where}: header checksum mismatch (damaged file)")
    try:
        header = json.loads(bytes(hraw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ContainerError(f"{where}: header is not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ContainerError(f"{where}: header does not describe a {FORMAT} v{VERSION} file")
    data_bytes = header.get("data_bytes")
    start = PREFIX.size + hlen
    if not _is_int(data_bytes) or data_bytes < 0:
        raise ContainerError(f"{where}: invalid data_bytes {data_bytes!r}")
    if start + data_bytes != size:
        raise ContainerError(f"{where}: file has {size} bytes, header expects {start + data_bytes} (truncated or padded)")
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise ContainerError(f"{where}: header has no tensor list")
    entries = [_validate_entry(e, i, data_bytes, where) for i, e in enumerate(tensors)]
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ContainerError(f"{where}: duplicate tensor names")
    spans = sorted((e["offset"], e["length"], e["name"]) for e in entries)
    for (o1, l1, n1), (o2, _, n2) in zip(spans, spans[1:], strict=False):
        if o1 + l1 > o2:
            raise ContainerError(f"{where}: streams of {n1!r} and {n2!r} overlap")
    if not isinstance(header.get("metadata", {}), dict):
        raise ContainerError(f"{where}: metadata is not an object")
    return header, start


class _Reader:
    """An open .ggz file whose prefix and header have been validated; streams are read on demand."""

    def __init__(self, path: str | os.PathLike):
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
            self.header, self.start = _parse(memoryview(head), size, where)
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, e: dict) -> bytes:
        self._f.seek(self.start + e["offset"])
        buf = self._f.read(e["length"])
        if len(buf) != e["length"] or _crc(buf) != e["crc32"]:
            raise ContainerError(f"{self.path}: tensor {e['name']!r}: stream checksum mismatch (damaged data)")
        return buf

    def integers(self, e: dict) -> np.ndarray:
        """The decoded quantized integers of a quantized entry (int64, flat), verified."""
        tag = f"{self.path}: tensor {e['name']!r}"
        n = math.prod(e["shape"])
        gg = GGParams(*e["gg"]) if e["coder"] == "ans" else None
        try:
            q = registry.decode(e["coder"], self.stream(e), n, e["params"], gg)
        except CodingError as err:
            raise ContainerError(f"{tag}: {err}") from err
        if q.size and (int(q.min()) < -quant.Q_LIMIT or int(q.max()) > quant.Q_LIMIT):
            raise ContainerError(f"{tag}: decoded integers exceed +-{quant.Q_LIMIT}")
        if _qcrc(q) != e["qcrc32"]:
            raise ContainerError(f"{tag}: decoded integers do not match their checksum")
        return q

    def tensor(self, e: dict, device: torch.device | str | None = None) -> torch.Tensor:
        shape = tuple(e["shape"])
        if e["encoding"] == "raw":
            t = _from_raw(self.stream(e), e["dtype"], shape)
        else:
            q = torch.from_numpy(self.integers(e)).reshape(shape)
            t = quant.dequantize(q, e["step"], DTYPES[e["dtype"]][0])
        return t.to(device) if device is not None else t


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of a .ggz file (streams are not read)."""
    with _Reader(path) as r:
        return r.header


def load_compressed(path: str | os.PathLike, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Decode a .ggz file into a state dict (dequantized tensors in their original dtypes).

    Raises :class:`ContainerError` naming the file and tensor on any damage.
    """
    with _Reader(path) as r:
        return {e["name"]: r.tensor(e, device) for e in r.header["tensors"]}


def load_integers(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, float]]:
    """The quantized tensors of a .ggz file as ``name -> (int64 integers in shape, step)``."""
    with _Reader(path) as r:
        return {e["name"]: (torch.from_numpy(r.integers(e)).reshape(tuple(e["shape"])), e["step"])
                for e in r.header["tensors"] if e["encoding"] == "quantized"}


def inspect_rows(path: str | os.PathLike) -> list[dict]:
    """One row per tensor: shape, dtype, encoding, coder, bytes, bits/weight, step, GG parameters."""
    rows = []
    for e in read_header(path)["tensors"]:
        numel = math.prod(e["shape"])
        row = {"name": e["name"], "shape": "x".join(map(str, e["shape"])) or "scalar", "dtype": e["dtype"],
               "coder": e.get("coder", "raw"), "bytes": e["length"],
               "bits_per_weight": 8 * e["length"] / numel if numel else 0.0}
        if e["encoding"] == "quantized":
            row["step"] = e["step"]
            if "gg" in e:
                mu, beta, gamma = e["gg"]
                row.update(gg_mu=mu * e["step"], gg_beta=beta * e["step"], gg_gamma=gamma)
        rows.append(row)
    return rows
