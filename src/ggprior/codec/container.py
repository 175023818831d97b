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

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..io.atomic import atomic_path
from ..io.sources import open_source, side_files
from . import ggmodel, rans, registry
from . import quantizer as quant
from .bits import CodingError
from .ggmodel import GGParams
from .histogram import Histogram, histogram

MAGIC = b"GGZ\x00\r\n\x1a\n"
VERSION = 2
VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sIII")
HEADER_MAX = 16 << 20
MAX_NDIM = 8
MAX_NUMEL = 1 << 40
FORMAT = "ggprior.ggz"
CHUNK_VALUES = 1 << 22
"""Values per chunk the writer uses (4M: 16 MB of int32 per chunk in flight per thread)."""
CHUNK_MAX = 1 << 24
"""Most values a reader accepts in one chunk."""
TABLE_CODERS = ("ans", "ans-hist")
"""Coders whose rANS frequency table is stored once per tensor (version 2)."""
FILE_MAX = 64 << 20
FILES_MAX = 256 << 20

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


def default_jobs() -> int:
    """Threads for coding chunks: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_max_bytes() -> int:
    """The default cap on decoded bytes: the machine's physical memory (a larger model cannot be loaded anyway)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 36


@contextlib.contextmanager
def written(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in an OSError raised while writing it (a full disk says which output failed)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or str(path) in str(err):
            raise
        raise OSError(err.errno, f"{path}: cannot write ({err.strerror or err})") from err


def _crc(data: bytes | memoryview | np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _qcrc(q: np.ndarray) -> int:
    return _crc(np.ascontiguousarray(q, dtype="<i4").view(np.uint8))


def _raw_bytes(t: torch.Tensor) -> bytes:
    name = _NAME_OF[t.dtype]
    c = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        c = c.view(torch.int16)
    elif name == "bool":
        c = c.to(torch.uint8)
    return np.ascontiguousarray(c.numpy(), dtype=DTYPES[name][1]).tobytes()


def _from_raw(buf: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    a = np.frombuffer(buf, dtype=DTYPES[dtype][1]).copy()
    t = torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    elif dtype == "bool":
        t = t.to(torch.bool)
    return t.reshape(shape)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_name(name: object, where: str) -> str:
    """The reader's rule for tensor names, also applied by the writer."""
    if not isinstance(name, str) or not name:
        raise ContainerError(f"{where}: tensor name {name!r} is not a non-empty string")
    return name


def _check_file_name(name: object, where: str) -> str:
    if (not isinstance(name, str) or not name or len(name) > 255 or name in (".", "..") or name.startswith(".")
            or any(c in name for c in "/\\\x00")):
        raise ContainerError(f"{where}: stored file name {name!r} is not a plain file name")
    return name


def _check_shape(shape: object, tag: str) -> int:
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d <= MAX_NUMEL for d in shape)):
        raise ContainerError(f"{tag}: invalid shape {shape!r} (at most {MAX_NDIM} dimensions)")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ContainerError(f"{tag}: {numel} elements exceed the limit of {MAX_NUMEL}")
    return numel


# ----------------------------------------------------------------------------------------- writing


class _Spool:
    """The data section, written to an anonymous temporary file as streams are produced."""

    def __init__(self, f: BinaryIO):
        self.f, self.size = f, 0

    def put(self, data: bytes | memoryview) -> dict:
        self.f.write(data)
        e = {"offset": self.size, "length": len(data), "crc32": _crc(data)}
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


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _encode_tensor(t: torch.Tensor, name: str, coder: str, rule: dict, gg_fit: str, pool: ThreadPoolExecutor,
                   spool: _Spool, chunk_values: int) -> dict:
    """Quantize (chunk by chunk, into one int32 array) and code one floating tensor."""
    s = quant.choose_step(t, name=name, **rule)
    flat = t.detach().reshape(-1)
    bounds = _chunks(flat.numel(), chunk_values)
    q = np.empty(flat.numel(), dtype=np.int32)

    def quantize_chunk(ab: tuple[int, int]) -> Histogram:
        qc = quant.quantize(flat[ab[0] : ab[1]], s, name=name).numpy()
        q[ab[0] : ab[1]] = qc
        return histogram(qc)

    hist = _merge(list(pool.map(quantize_chunk, bounds)))
    gg = ggmodel.fit(hist, gg_fit).as_float32()
    e: dict = {"encoding": "quantized", "coder": coder, "step": s, "gg": [gg.mu, gg.beta, gg.gamma]}
    freqs, qmin = None, 0
    if coder in TABLE_CODERS:
        qmin, freqs = registry.rans_table(coder, hist, gg)
        e["table"] = {"qmin": qmin, "nsym": int(freqs.size), "prob_bits": rans.PROB_BITS,
                      **spool.put(rans.pack_freqs(freqs))}

    def encode_chunk(ab: tuple[int, int]) -> dict:
        qc = q[ab[0] : ab[1]]
        if freqs is not None:
            data, params = rans.encode(qc - np.int32(qmin), freqs), {}
        else:
            data, params = registry.encode(coder, qc, gg)
        return {"n": ab[1] - ab[0], "params": params, "qcrc32": _qcrc(qc), "data": data}

    e["chunks"] = []
    for c in pool.map(encode_chunk, bounds):
        c.update(spool.put(c.pop("data")))
        e["chunks"].append(c)
    return e


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
) -> dict:
    """Quantize and entropy-code a model into a ``.ggz`` file (format version 2, written atomically).

    ``source`` is anything :func:`ggprior.io.open_source` accepts, a transformers model included:
    a folder's small non-weight files (config, tokenizer, ...) or a model's config are stored too
    (``files`` overrides them). Tensors sharing memory (tied weights) are stored once. Exactly one
    of ``step``, ``bits`` (per-tensor symmetric FL step) or ``rel_error`` selects the step; none
    means ``bits=10``. ``include`` picks the quantized floating tensors (``"all"`` or
    ``"matrices"``); other tensors are stored raw. ``coder`` is one of ``fl, eg, huffman, ans,
    ans-hist``. ``jobs`` threads code the chunks (default: every core). Returns the header (with
    ``file_bytes``).
    """
    coder = registry.check_coder(coder)
    step, bits, rel_error = quant.resolve_rule(step, bits, rel_error)
    rule = {"step": step, "bits": bits, "rel": rel_error}
    if not 1 <= int(chunk_values) <= CHUNK_MAX:
        raise ContainerError(f"chunk_values must lie in [1, {CHUNK_MAX}], got {chunk_values}")
    src = open_source(source)
    where = src.label
    if files is None:
        files, skipped = side_files(source, FILE_MAX)
    else:
        skipped = []
    for fname, data in files.items():
        _check_file_name(fname, where)
        if len(data) > FILE_MAX:
            raise ContainerError(f"{where}: file {fname!r} of {len(data)} bytes exceeds the {FILE_MAX}-byte cap")
    if sum(len(d) for d in files.values()) > FILES_MAX:
        raise ContainerError(f"{where}: the model's side files exceed {FILES_MAX} bytes together")
    aliases = src.aliases()
    entries: list[dict] = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written(path), tempfile.TemporaryFile(dir=path.parent) as f, ThreadPoolExecutor(jobs or default_jobs()) as pool:
        spool = _Spool(f)
        for name in tqdm(list(src), desc="compress", disable=not progress, leave=False):
            _check_name(name, where)
            tag = f"{where}: tensor {name!r}"
            shape = list(src.shape(name))
            dtype = _NAME_OF.get(src.dtype(name))
            if dtype is None:
                raise ContainerError(f"{tag}: unsupported dtype {src.dtype(name)}")
            numel = _check_shape(shape, tag)
            e: dict = {"name": name, "shape": shape, "dtype": dtype}
            if name in aliases:
                e.update(encoding="alias", of=aliases[name])
            elif dtype in FLOAT_DTYPES and numel and quant.is_included(name, tuple(shape), include):
                try:
                    e.update(_encode_tensor(src[name], name, coder, rule, gg_fit, pool, spool, chunk_values))
                except CodingError as err:
                    raise ContainerError(f"{tag}: {err}") from err
            else:
                e.update(encoding="raw", **spool.put(_raw_bytes(src[name])))
            entries.append(e)
        stored = [{"name": k, **spool.put(v)} for k, v in files.items()]
        meta = {"source": where, "coder": coder, "include": include, "step_rule": quant.step_rule(step, bits, rel_error)}
        if skipped:
            meta["files_skipped"] = ", ".join(skipped)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        header = {"format": FORMAT, "version": VERSION, "data_bytes": spool.size, "metadata": meta,
                  "tensors": entries, "files": stored}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        if len(hbytes) > HEADER_MAX:
            raise ContainerError(f"{path}: header of {len(hbytes)} bytes exceeds the {HEADER_MAX}-byte cap")
        f.seek(0)
        with written(path), atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(PREFIX.pack(MAGIC, VERSION, len(hbytes), _crc(hbytes)))
            out.write(hbytes)
            shutil.copyfileobj(f, out, 1 << 22)
    header["file_bytes"] = PREFIX.size + len(hbytes) + spool.size
    return header


# ----------------------------------------------------------------------------------------- reading


def _check_stream(e: dict, tag: str, what: str = "") -> None:
    for k in ("offset", "length", "crc32"):
        if not _is_int(e.get(k)) or e[k] < 0:
            raise ContainerError(f"{tag}: invalid {what}{k} {e.get(k)!r}")
    if e["crc32"] > 0xFFFFFFFF:
        raise ContainerError(f"{tag}: invalid {what}crc32 {e['crc32']!r}")


def _check_gg(e: dict, tag: str) -> None:
    gg = e.get("gg")
    if not (isinstance(gg, list) and len(gg) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in gg)
            and gg[1] > 0 and gg[2] > 0):
        raise ContainerError(f"{tag}: invalid GG parameters {gg!r}")


def _check_quantized_common(e: dict, tag: str) -> None:
    if e["dtype"] not in FLOAT_DTYPES:
        raise ContainerError(f"{tag}: quantized tensor with non-float dtype {e['dtype']!r}")
    try:
        e["coder"] = registry.check_coder(e.get("coder", ""))
        quant.check_step(e.get("step") if isinstance(e.get("step"), float) else float("nan"), tag)
    except (CodingError, quant.QuantError) as err:
        raise ContainerError(f"{tag}: {err}") from err


def _validate_v1(e: dict, tag: str, numel: int) -> list[tuple[int, int]]:
    _check_stream(e, tag)
    if e.get("encoding") == "raw":
        need = numel * np.dtype(DTYPES[e["dtype"]][1]).itemsize
        if e["length"] != need:
            raise ContainerError(f"{tag}: raw stream has {e['length']} bytes, shape and dtype need {need}")
    elif e.get("encoding") == "quantized":
        _check_quantized_common(e, tag)
        if not isinstance(e.get("params"), dict):
            raise ContainerError(f"{tag}: missing coder parameters")
        if not _is_int(e.get("qcrc32")) or not 0 <= e["qcrc32"] <= 0xFFFFFFFF:
            raise ContainerError(f"{tag}: invalid qcrc32 {e.get('qcrc32')!r}")
        if e["coder"] == "ans" or "gg" in e:
            _check_gg(e, tag)
    else:
        raise ContainerError(f"{tag}: unknown encoding {e.get('encoding')!r}")
    return [(e["offset"], e["length"])]


def _validate_v2(e: dict, tag: str, numel: int) -> list[tuple[int, int]]:
    enc = e.get("encoding")
    if enc == "alias":
        if not isinstance(e.get("of"), str):
            raise ContainerError(f"{tag}: alias without a target name")
        return []
    if enc == "raw":
        return _validate_v1(e, tag, numel)
    if enc != "quantized":
        raise ContainerError(f"{tag}: unknown encoding {enc!r}")
    _check_quantized_common(e, tag)
    if "gg" in e:
        _check_gg(e, tag)
    spans = []
    if e["coder"] in TABLE_CODERS:
        t = e.get("table")
        if not isinstance(t, dict):
            raise ContainerError(f"{tag}: coder {e['coder']!r} needs a frequency table")
        _check_stream(t, tag, "table ")
        if not (_is_int(t.get("qmin")) and abs(t["qmin"]) <= quant.Q_LIMIT and _is_int(t.get("nsym"))
                and 2 <= t["nsym"] <= rans.NSYM_MAX and _is_int(t.get("prob_bits"))
                and rans.MIN_PROB_BITS <= t["prob_bits"] <= rans.MAX_PROB_BITS):
            raise ContainerError(f"{tag}: invalid frequency table parameters")
        spans.append((t["offset"], t["length"]))
    elif "table" in e:
        raise ContainerError(f"{tag}: coder {e['coder']!r} takes no frequency table")
    chunks = e.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise ContainerError(f"{tag}: quantized tensor without chunks")
    total = 0
    for c in chunks:
        if not isinstance(c, dict) or not _is_int(c.get("n")) or not 1 <= c["n"] <= CHUNK_MAX:
            raise ContainerError(f"{tag}: invalid chunk (each holds 1 to {CHUNK_MAX} values)")
        _check_stream(c, tag, "chunk ")
        if not _is_int(c.get("qcrc32")) or not 0 <= c["qcrc32"] <= 0xFFFFFFFF:
            raise ContainerError(f"{tag}: invalid chunk qcrc32 {c.get('qcrc32')!r}")
        if not isinstance(c.get("params"), dict) or (e["coder"] in TABLE_CODERS and c["params"]):
            raise ContainerError(f"{tag}: invalid chunk parameters {c.get('params')!r}")
        total += c["n"]
        spans.append((c["offset"], c["length"]))
    if total != numel:
        raise ContainerError(f"{tag}: chunks hold {total} values, the shape {numel}")
    return spans


def _parse(mm: memoryview, size: int, where: str) -> tuple[dict, int]:
    """Validate the prefix and header (``mm`` holds at least the prefix and header bytes)."""
    if size < PREFIX.size or len(mm) < PREFIX.size:
        raise ContainerError(f"{where}: {size} bytes is too short for a .ggz file")
    magic, version, hlen, hcrc = PREFIX.unpack(bytes(mm[: PREFIX.size]))
    if magic != MAGIC:
        raise ContainerError(f"{where}: not a .ggz file (bad magic {magic!r})")
    if version not in VERSIONS:
        raise ContainerError(f"{where}: unsupported .ggz version {version} (this reader knows {VERSIONS})")
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
    if (not isinstance(header, dict) or header.get("format") != FORMAT or not _is_int(header.get("version"))
            or header["version"] != version):
        raise ContainerError(f"{where}: header does not describe a {FORMAT} v{version} file")
    data_bytes = header.get("data_bytes")
    start = PREFIX.size + hlen
    if not _is_int(data_bytes) or data_bytes < 0:
        raise ContainerError(f"{where}: invalid data_bytes {data_bytes!r}")
    if start + data_bytes != size:
        raise ContainerError(f"{where}: file has {size} bytes, header expects {start + data_bytes} (truncated or padded)")
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise ContainerError(f"{where}: header has no tensor list")
    spans: list[tuple[int, int, str]] = []
    byname: dict[str, dict] = {}
    for i, e in enumerate(tensors):
        if not isinstance(e, dict):
            raise ContainerError(f"{where}: tensor entry {i} is not an object")
        name = _check_name(e.get("name"), f"{where}: tensor entry {i}")
        tag = f"{where}: tensor {name!r}"
        numel = _check_shape(e.get("shape"), tag)
        if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
            raise ContainerError(f"{tag}: unsupported dtype {e.get('dtype')!r}")
        if name in byname:
            raise ContainerError(f"{where}: duplicate tensor name {name!r}")
        byname[name] = e
        check = _validate_v1 if version == 1 else _validate_v2
        spans += [(o, n, name) for o, n in check(e, tag, numel)]
    for e in tensors:
        if e["encoding"] == "alias":
            t = byname.get(e["of"])
            if t is None or t["encoding"] == "alias" or (t["shape"], t["dtype"]) != (e["shape"], e["dtype"]):
                raise ContainerError(f"{where}: tensor {e['name']!r} is an alias of {e['of']!r}, "
                                     "which is not a stored tensor of the same shape and dtype")
    files = header.setdefault("files", [])
    if not isinstance(files, list) or (version == 1 and files):
        raise ContainerError(f"{where}: invalid file list")
    seen = set()
    for f in files:
        if not isinstance(f, dict):
            raise ContainerError(f"{where}: invalid file entry")
        fname = _check_file_name(f.get("name"), where)
        _check_stream(f, f"{where}: file {fname!r}")
        if f["length"] > FILE_MAX or fname in seen:
            raise ContainerError(f"{where}: file {fname!r} is duplicated or exceeds {FILE_MAX} bytes")
        seen.add(fname)
        spans.append((f["offset"], f["length"], fname))
    spans.sort()
    end = 0
    for o, n, name in spans:
        if o < end or (version > 1 and o != end):
            raise ContainerError(f"{where}: stream of {name!r} at {o} overlaps or leaves a gap (expected {end})")
        end = o + n
    if end > data_bytes or (version > 1 and end != data_bytes):
        raise ContainerError(f"{where}: streams end at {end}, the data section holds {data_bytes} bytes")
    if not isinstance(header.get("metadata", {}), dict):
        raise ContainerError(f"{where}: metadata is not an object")
    return header, start


def decoded_bytes(header: dict) -> int:
    """Bytes of every stored tensor once decoded (aliases counted once)."""
    return sum(math.prod(e["shape"]) * DTYPES[e["dtype"]][0].itemsize
               for e in header["tensors"] if e["encoding"] != "alias")


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
            self.header, self.start = _parse(memoryview(head), size, where)
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
        if len(buf) != e["length"] or _crc(buf) != e["crc32"]:
            raise ContainerError(f"{self.path}: {name}: stream checksum mismatch (damaged data)")
        return buf

    def files(self) -> dict[str, bytes]:
        """The stored side files (config, tokenizer, ...)."""
        return {f["name"]: self.stream(f, f"file {f['name']!r}") for f in self.header["files"]}

    def _checked(self, q: np.ndarray, qcrc: int, tag: str) -> np.ndarray:
        if q.size and (int(q.min()) < -quant.Q_LIMIT or int(q.max()) > quant.Q_LIMIT):
            raise ContainerError(f"{tag}: decoded integers exceed +-{quant.Q_LIMIT}")
        if _qcrc(q) != qcrc:
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
        dtype = DTYPES[e["dtype"]][0]
        out = torch.empty(math.prod(shape), dtype=dtype)
        bounds, decode = self._chunk_decoder(e)

        def put(i: int) -> None:
            a, b = bounds[i]
            out[a:b] = quant.dequantize(torch.from_numpy(decode(i)), e["step"], dtype)

        list(self._pool.map(put, range(len(bounds))))
        return out.reshape(shape)

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
        sd = {k: t if device is None else t.to(device) for k, t in r.tensors()}
    if model is not None:
        return load_into(model, sd, strict=strict)
    return sd


def load_integers(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, float]]:
    """The quantized tensors of a .ggz file as ``name -> (integers in shape, step)``."""
    with Reader(path) as r:
        return {e["name"]: (torch.from_numpy(r.integers(e["name"])).reshape(tuple(e["shape"])), e["step"])
                for e in r.header["tensors"] if e["encoding"] == "quantized"}


def stored_bytes(e: dict) -> int:
    """Bytes a tensor entry takes in the data section (its chunks and table; 0 for an alias)."""
    if e["encoding"] == "alias":
        return 0
    if "chunks" in e:
        return sum(c["length"] for c in e["chunks"]) + e.get("table", {}).get("length", 0)
    return e["length"]


def inspect_rows(path: str | os.PathLike) -> list[dict]:
    """One row per tensor: shape, dtype, encoding, coder, bytes, bits/weight, step, GG parameters."""
    rows = []
    for e in read_header(path)["tensors"]:
        numel = math.prod(e["shape"])
        nbytes = stored_bytes(e)
        coder = e.get("coder", e["encoding"]) if e["encoding"] != "alias" else f"alias of {e['of']}"
        row = {"name": e["name"], "shape": "x".join(map(str, e["shape"])) or "scalar", "dtype": e["dtype"],
               "coder": coder, "bytes": nbytes, "bits_per_weight": 8 * nbytes / numel if numel else 0.0}
        if e["encoding"] == "quantized":
            row["step"] = e["step"]
            if "gg" in e:
                mu, beta, gamma = e["gg"]
                row.update(gg_mu=mu * e["step"], gg_beta=beta * e["step"], gg_gamma=gamma)
        rows.append(row)
    return rows

