"""safetensors files written atomically, and tensors that share storage.

safetensors refuses two entries on one storage (a tied LM head and its embedding): writers
either copy them apart (:func:`save_tensors`) or store one and name the others as aliases of it
(:func:`dedupe`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from .atomic import atomic_path

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DEFAULT_MAX_SHARD = "50GB"
"""The default shard size of ``transformers``' ``save_pretrained`` (5.x)."""


def storage_ptr(t: torch.Tensor) -> int:
    """The address of the storage ``t`` views (equal for tensors sharing memory)."""
    return t.untyped_storage().data_ptr()


def dedupe(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the same view of the same storage as an earlier one.

    Returns (kept tensors, contiguous and detached; ``alias -> kept name`` of the dropped ones).
    """
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in tensors.items():
        key = (t.device.type, storage_ptr(t), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().contiguous()
    return out, aliases


def shared_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``name -> first name`` for tensors that view the same memory as an earlier one (tied weights).

    Raises ValueError when two names start at the same memory with a different shape, dtype or
    stride: one storage cannot be written once and read back as both.
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.device.type, storage_ptr(t), t.storage_offset())
        j = first.setdefault(key, k)
        if j == k:
            continue
        u = tensors[j]
        if (t.shape, t.dtype, t.stride()) != (u.shape, u.dtype, u.stride()):
            raise ValueError(f"tensors {j!r} {tuple(u.shape)} and {k!r} {tuple(t.shape)} share memory with "
                             "different shapes or dtypes; clone one of them")
        out[k] = j
    return out


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or as transformers spells it (``"5GB"`` = 5e9, ``"500MiB"`` = 500 * 2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a size: {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor in C order, as safetensors stores them (no copy when contiguous)."""
    c = t.detach().to("cpu").contiguous()
    if c.dtype == torch.bool:
        c = c.to(torch.uint8)
    return memoryview(c.reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, so only one tensor is in memory at once.

    The header is laid out from ``specs`` (name, dtype, shape) up front; :meth:`write` then takes
    the tensors in that order.
    """

    def __init__(self, f: BinaryIO, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        head: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        off = 0
        for name, dtype, shape in specs:
            n = dtype.itemsize
            for d in shape:
                n *= d
            head[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((name, dtype, tuple(shape)))
            off += n
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + off
        self._f, self._next = f, 0
        f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append the next tensor (it must be the next of the specs, with that dtype and shape)."""
        want = self._order[self._next]
        if (name, t.dtype, tuple(t.shape)) != want:
            raise ValueError(f"safetensors writer: expected {want}, got {(name, t.dtype, tuple(t.shape))}")
        self._f.write(tensor_bytes(t))
        self._next += 1

    def close(self) -> None:
        """Check that every tensor of the header was written."""
        if self._next != len(self._order):
            raise ValueError(f"safetensors writer: {len(self._order) - self._next} tensors were not written")


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int | str) -> list[list]:
    """Split tensor specs into shards of at most ``max_shard_size`` bytes, in order, as ``save_pretrained`` does
    (a tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    used = 0
    for spec in specs:
        n = spec[1].itemsize
        for d in spec[2]:
            n *= d
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += n
    return shards


def floating_values(tensors: Mapping[str, torch.Tensor]) -> int:
    """The number of floating-point values in ``tensors``, each storage counted once."""
    seen, n = set(), 0
    for t in tensors.values():
        if t.dtype.is_floating_point and storage_ptr(t) not in seen:
            seen.add(storage_ptr(t))
            n += t.numel()
    return n


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> None:
    """Write tensors to a safetensors file atomically (shared storage is copied apart)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = storage_ptr(t)
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
