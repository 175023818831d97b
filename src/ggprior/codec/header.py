"""The ``.ggz`` header: format constants, dtypes, and the checks a header passes before any stream is read.

The writer applies the same name, shape and dtype rules (:func:`check_name`, :func:`check_shape`),
so whatever it writes reads back. Layout and fields: docs/format.md.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import torch

from . import channels, rans, registry, trellis
from . import quantizer as quant
from .bits import CodingError

MAGIC = b"GGZ\x00\r\n\x1a\n"
VERSION = 2
VERSION_CHANNELS = 3
"""The version of a file with channel scales (:mod:`.channels`), so that older readers refuse it; others are 2."""
VERSIONS = (1, 2, 3)
PREFIX = struct.Struct("<8sIII")
HEADER_MAX = 16 << 20
MAX_NDIM = 8
MAX_NUMEL = 1 << 40
FORMAT = "ggprior.ggz"
CHUNK_VALUES = 1 << 22
"""Values per chunk the writer uses (4M: 16 MB of int32 per chunk in flight per thread)."""
PIECE_VALUES = 1 << 20
"""Values a thread quantizes or dequantizes at once (8 MB of float64 temporaries)."""
CHUNK_MAX = 1 << 24
"""Most values a reader accepts in one chunk."""
TABLE_CODERS = ("ans", "ans-hist")
"""Coders whose rANS frequency table is stored once per tensor (version 2)."""
FILE_MAX = 64 << 20
FILES_MAX = 256 << 20
FILES_COUNT_MAX = 4096
"""Most side files one file stores."""
FILE_DEPTH_MAX = 8
"""Most parts of a side file's path (``1_Pooling/config.json`` has 2)."""

DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "<f8"), "float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"), "int64": (torch.int64, "<i8"), "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"), "int8": (torch.int8, "<i1"), "uint8": (torch.uint8, "<u1"),
    "bool": (torch.bool, "<u1"),
}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
LOSSLESS_DTYPES = ("float32", "float16", "bfloat16")
"""Dtypes of ``lossless`` entries (version 2; :mod:`ggprior.codec.lossless`)."""


class ContainerError(ValueError):
    """A .ggz file is damaged, truncated, or not a .ggz file; or a model cannot be written."""


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive pieces of at most ``size`` of ``n`` values."""
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def crc(data: bytes | memoryview | np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def qcrc(q: np.ndarray) -> int:
    return crc(np.ascontiguousarray(q, dtype="<i4").view(np.uint8))


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_name(name: object, where: str) -> str:
    """The reader's rule for tensor names, also applied by the writer."""
    if not isinstance(name, str) or not name:
        raise ContainerError(f"{where}: tensor name {name!r} is not a non-empty string")
    return name


def check_file_name(name: object, where: str) -> str:
    """The rule for side-file names (reader and writer): a relative path inside the model folder of at
    most 255 characters and ``FILE_DEPTH_MAX`` parts split by ``/``; no part empty, ``.``, ``..`` or
    hidden (starting with ``.``); no ``\\`` or NUL."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not name or len(name) > 255 or len(parts) > FILE_DEPTH_MAX
            or any(not p or p.startswith(".") for p in parts) or any(c in name for c in "\\\x00")):
        raise ContainerError(f"{where}: stored file name {name!r} is not a relative path inside the folder")
    return name


def check_file_set(names: list[str], where: str) -> None:
    """The rules for a file's side files together: at most ``FILES_COUNT_MAX``, unique, and no name
    is also the folder of another (``a`` and ``a/b``)."""
    if len(names) > FILES_COUNT_MAX:
        raise ContainerError(f"{where}: {len(names)} side files, more than {FILES_COUNT_MAX}")
    seen = set(names)
    if len(seen) != len(names):
        raise ContainerError(f"{where}: a side file name is duplicated")
    for n in names:
        parts = n.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in seen:
                raise ContainerError(f"{where}: side file {'/'.join(parts[:k])!r} is also the folder of {n!r}")


def check_shape(shape: object, tag: str) -> int:
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(is_int(d) and 0 <= d <= MAX_NUMEL for d in shape)):
        raise ContainerError(f"{tag}: invalid shape {shape!r} (at most {MAX_NDIM} dimensions)")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ContainerError(f"{tag}: {numel} elements exceed the limit of {MAX_NUMEL}")
    return numel




def _check_stream(e: dict, tag: str, what: str = "") -> None:
    for k in ("offset", "length", "crc32"):
        if not is_int(e.get(k)) or e[k] < 0:
            raise ContainerError(f"{tag}: invalid {what}{k} {e.get(k)!r}")
    if e["crc32"] > 0xFFFFFFFF:
        raise ContainerError(f"{tag}: invalid {what}crc32 {e['crc32']!r}")


def _check_gg(e: dict, tag: str) -> None:
    gg = e.get("gg")
    if not (isinstance(gg, list) and len(gg) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in gg)
            and gg[1] > 0 and gg[2] > 0):
        raise ContainerError(f"{tag}: invalid GG parameters {gg!r}")


def _check_quantized_common(e: dict, tag: str, rows_allowed: bool = False) -> None:
    if e["dtype"] not in FLOAT_DTYPES:
        raise ContainerError(f"{tag}: quantized tensor with non-float dtype {e['dtype']!r}")
    try:
        e["coder"] = registry.check_coder(e.get("coder", ""))
        if "row_steps" not in e or not rows_allowed:
            quant.check_step(e.get("step") if isinstance(e.get("step"), float) else float("nan"), tag)
    except (CodingError, quant.QuantError) as err:
        raise ContainerError(f"{tag}: {err}") from err


def _check_row_steps(e: dict, tag: str) -> list[tuple[int, int]]:
    """Per-row steps (version 2): one fl-coded bfloat16 pattern per row (dim 0) instead of ``step``."""
    if "row_steps" not in e:
        return []
    r = e["row_steps"]
    if "step" in e or not isinstance(r, dict) or len(e["shape"]) < 2:
        raise ContainerError(f"{tag}: row_steps need a tensor of 2+ dimensions and no step")
    _check_stream(r, tag, "row_steps ")
    if not (is_int(r.get("qmin")) and 1 <= r["qmin"] <= 0x7F7F and is_int(r.get("width"))
            and 1 <= r["width"] <= quant.ROW_STEP_BITS):
        raise ContainerError(f"{tag}: invalid row_steps parameters")
    need = (e["shape"][0] * r["width"] + 7) >> 3
    if r["length"] != need:
        raise ContainerError(f"{tag}: row_steps stream of {r['length']} bytes; {e['shape'][0]} rows of "
                             f"{r['width']} bits need {need}")
    return [(r["offset"], r["length"])]


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
        if not is_int(e.get("qcrc32")) or not 0 <= e["qcrc32"] <= 0xFFFFFFFF:
            raise ContainerError(f"{tag}: invalid qcrc32 {e.get('qcrc32')!r}")
        if e["coder"] == "ans" or "gg" in e:
            _check_gg(e, tag)
    else:
        raise ContainerError(f"{tag}: unknown encoding {e.get('encoding')!r}")
    return [(e["offset"], e["length"])]


def _check_channel_scales(e: dict, tag: str, version: int) -> list[tuple[int, int]]:
    """Channel scales (version 3): row then column codes, fl-coded, on a quantized (one ``step``) or trellis
    entry of 2+ dimensions."""
    if "channel_scales" not in e:
        return []
    r = e["channel_scales"]
    if version < VERSION_CHANNELS:
        raise ContainerError(f"{tag}: channel_scales in a version {version} file (they need version {VERSION_CHANNELS})")
    if not isinstance(r, dict) or len(e["shape"]) < 2 or "row_steps" in e:
        raise ContainerError(f"{tag}: channel_scales need a tensor of 2+ dimensions and no row_steps")
    _check_stream(r, tag, "channel_scales ")
    if not (is_int(r.get("qmin")) and abs(r["qmin"]) <= channels.CODE_MAX and is_int(r.get("width"))
            and 1 <= r["width"] <= 8):
        raise ContainerError(f"{tag}: invalid channel_scales parameters")
    count = e["shape"][0] + math.prod(e["shape"][1:])
    need = (count * r["width"] + 7) >> 3
    if r["length"] != need:
        raise ContainerError(f"{tag}: channel_scales stream of {r['length']} bytes; {count} codes of "
                             f"{r['width']} bits need {need}")
    return [(r["offset"], r["length"])]


def _validate_lossless(e: dict, tag: str, numel: int) -> list[tuple[int, int]]:
    """A lossless entry (version 2): bf16/fp16/fp32, chunks ``{n, offset, length, crc32}`` covering the tensor."""
    if e["dtype"] not in LOSSLESS_DTYPES:
        raise ContainerError(f"{tag}: lossless tensor of dtype {e['dtype']!r} (expected one of {LOSSLESS_DTYPES})")
    return _plain_chunks(e, tag, numel, "lossless")


def _validate_trellis(e: dict, tag: str, numel: int) -> list[tuple[int, int]]:
    """A trellis entry (version 2): a float dtype, ``step``, ``states`` and chunks of trellis payloads."""
    if e["dtype"] not in FLOAT_DTYPES:
        raise ContainerError(f"{tag}: trellis tensor with non-float dtype {e['dtype']!r}")
    try:
        quant.check_step(e.get("step") if isinstance(e.get("step"), float) else float("nan"), tag)
    except quant.QuantError as err:
        raise ContainerError(str(err)) from err
    if not is_int(e.get("states")) or e["states"] not in trellis.TRELLISES:
        raise ContainerError(f"{tag}: trellis states {e.get('states')!r} not one of {sorted(trellis.TRELLISES)}")
    return _plain_chunks(e, tag, numel, "trellis")


def _plain_chunks(e: dict, tag: str, numel: int, what: str) -> list[tuple[int, int]]:
    """Spans of chunks ``{n, offset, length, crc32}`` whose ``n`` (each in [1, CHUNK_MAX]) sum to ``numel``."""
    chunks = e.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise ContainerError(f"{tag}: {what} tensor without chunks")
    spans, total = [], 0
    for c in chunks:
        if not isinstance(c, dict) or not is_int(c.get("n")) or not 1 <= c["n"] <= CHUNK_MAX:
            raise ContainerError(f"{tag}: invalid chunk (each holds 1 to {CHUNK_MAX} values)")
        _check_stream(c, tag, "chunk ")
        total += c["n"]
        spans.append((c["offset"], c["length"]))
    if total != numel:
        raise ContainerError(f"{tag}: chunks hold {total} values, the shape {numel}")
    return spans


def _validate_v2(e: dict, tag: str, numel: int, version: int = VERSION) -> list[tuple[int, int]]:
    enc = e.get("encoding")
    if enc in ("quantized", "trellis"):
        return _check_channel_scales(e, tag, version) + _validate_coded(e, tag, numel)
    if "channel_scales" in e:
        raise ContainerError(f"{tag}: channel_scales on a {enc!r} entry")
    if enc == "alias":
        if not isinstance(e.get("of"), str):
            raise ContainerError(f"{tag}: alias without a target name")
        return []
    if enc == "raw":
        return _validate_v1(e, tag, numel)
    if enc == "lossless":
        return _validate_lossless(e, tag, numel)
    raise ContainerError(f"{tag}: unknown encoding {enc!r}")


def _validate_coded(e: dict, tag: str, numel: int) -> list[tuple[int, int]]:
    if e["encoding"] == "trellis":
        return _validate_trellis(e, tag, numel)
    _check_quantized_common(e, tag, rows_allowed=True)
    if "gg" in e:
        _check_gg(e, tag)
    spans = _check_row_steps(e, tag)
    if e["coder"] in TABLE_CODERS:
        t = e.get("table")
        if not isinstance(t, dict):
            raise ContainerError(f"{tag}: coder {e['coder']!r} needs a frequency table")
        _check_stream(t, tag, "table ")
        if not (is_int(t.get("qmin")) and abs(t["qmin"]) <= quant.Q_LIMIT and is_int(t.get("nsym"))
                and 2 <= t["nsym"] <= rans.NSYM_MAX and is_int(t.get("prob_bits"))
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
        if not isinstance(c, dict) or not is_int(c.get("n")) or not 1 <= c["n"] <= CHUNK_MAX:
            raise ContainerError(f"{tag}: invalid chunk (each holds 1 to {CHUNK_MAX} values)")
        _check_stream(c, tag, "chunk ")
        if not is_int(c.get("qcrc32")) or not 0 <= c["qcrc32"] <= 0xFFFFFFFF:
            raise ContainerError(f"{tag}: invalid chunk qcrc32 {c.get('qcrc32')!r}")
        if not isinstance(c.get("params"), dict) or (e["coder"] in TABLE_CODERS and c["params"]):
            raise ContainerError(f"{tag}: invalid chunk parameters {c.get('params')!r}")
        total += c["n"]
        spans.append((c["offset"], c["length"]))
    if total != numel:
        raise ContainerError(f"{tag}: chunks hold {total} values, the shape {numel}")
    return spans


def parse(mm: memoryview, size: int, where: str) -> tuple[dict, int]:
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
    if crc(hraw) != hcrc:
        raise ContainerError(f"{where}: header checksum mismatch (damaged file)")
    try:
        header = json.loads(bytes(hraw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ContainerError(f"{where}: header is not valid JSON ({err})") from err
    if (not isinstance(header, dict) or header.get("format") != FORMAT or not is_int(header.get("version"))
            or header["version"] != version):
        raise ContainerError(f"{where}: header does not describe a {FORMAT} v{version} file")
    data_bytes = header.get("data_bytes")
    start = PREFIX.size + hlen
    if not is_int(data_bytes) or data_bytes < 0:
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
        name = check_name(e.get("name"), f"{where}: tensor entry {i}")
        tag = f"{where}: tensor {name!r}"
        numel = check_shape(e.get("shape"), tag)
        if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
            raise ContainerError(f"{tag}: unsupported dtype {e.get('dtype')!r}")
        if name in byname:
            raise ContainerError(f"{where}: duplicate tensor name {name!r}")
        byname[name] = e
        got = _validate_v1(e, tag, numel) if version == 1 else _validate_v2(e, tag, numel, version)
        spans += [(o, n, name) for o, n in got]
    for e in tensors:
        if e["encoding"] == "alias":
            t = byname.get(e["of"])
            if t is None or t["encoding"] == "alias" or (t["shape"], t["dtype"]) != (e["shape"], e["dtype"]):
                raise ContainerError(f"{where}: tensor {e['name']!r} is an alias of {e['of']!r}, "
                                     "which is not a stored tensor of the same shape and dtype")
    files = header.setdefault("files", [])
    if not isinstance(files, list) or (version == 1 and files):
        raise ContainerError(f"{where}: invalid file list")
    for f in files:
        if not isinstance(f, dict):
            raise ContainerError(f"{where}: invalid file entry")
        fname = check_file_name(f.get("name"), where)
        _check_stream(f, f"{where}: file {fname!r}")
        if f["length"] > FILE_MAX:
            raise ContainerError(f"{where}: file {fname!r} exceeds {FILE_MAX} bytes")
        spans.append((f["offset"], f["length"], fname))
    check_file_set([f["name"] for f in files], where)
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


def stored_bytes(e: dict) -> int:
    """Bytes a tensor entry takes in the data section (its chunks and table; 0 for an alias)."""
    if e["encoding"] == "alias":
        return 0
    if "chunks" in e:
        side = sum(e.get(k, {}).get("length", 0) for k in ("table", "row_steps", "channel_scales"))
        return sum(c["length"] for c in e["chunks"]) + side
    return e["length"]
