"""safetensors files written atomically, and tensors that share storage.

safetensors refuses two entries on one storage (a tied LM head and its embedding): writers
either copy them apart (:func:`save_tensors`) or store one and name the others as aliases of it
(:func:`dedupe`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from .atomic import atomic_path


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
