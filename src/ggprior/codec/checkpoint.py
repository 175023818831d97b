"""A ``.ggz`` file back to a checkpoint: a Hugging Face folder, a safetensors file, or a transformers model.

:func:`decompress` streams tensors one at a time into safetensors files (sharded with a
``model.safetensors.index.json`` above ``max_shard_size``, like ``save_pretrained``) and writes the
stored side files (config, tokenizer, ...) beside them, so ``AutoModel*.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load the folder as it is. Memory stays bounded by the largest
tensor: the next tensor decodes while one is written, two at most. :func:`from_pretrained` returns the
transformers model of a ``.ggz`` file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from ..io.atomic import atomic_dir, atomic_path
from ..io.tensors import DEFAULT_MAX_SHARD, SafetensorsWriter, plan_shards
from .container import DTYPES, ContainerError, Reader, default_jobs, written

INDEX = "model.safetensors.index.json"


def _decoded(r: Reader, names: list[str], depth: int) -> Iterator[torch.Tensor]:
    """The tensors ``names`` in order; up to ``depth`` decode at once (the next ones while the caller
    writes this one), their chunks sharing the reader's pool."""
    with ThreadPoolExecutor(depth) as ahead:
        window = deque(ahead.submit(r.tensor, n) for n in names[: depth - 1])
        for k in range(len(names)):
            if k + depth - 1 < len(names):
                window.append(ahead.submit(r.tensor, names[k + depth - 1]))
            yield window.popleft().result()


def _write_files(r: Reader, plan: list[tuple[Path, list]], metadata: dict, jobs: int,
                 tick: Callable[[], None]) -> None:
    """Write each ``(path, specs)`` of ``plan`` as a safetensors file.

    With more than one job, tensor k+1 decodes while tensor k is written, so the write is not a
    serial step between decodes; at most two decoded tensors are in memory. With one job the
    steps run in turn.
    """
    names = [name for _, specs in plan for name, _, _ in specs]
    with closing(_decoded(r, names, 2 if jobs > 1 else 1)) as tensors:
        for path, specs in plan:
            with open(path, "wb") as f:
                w = SafetensorsWriter(f, specs, metadata)
                for name, _, _ in specs:
                    w.write(name, next(tensors))  # no reference kept: freed before the next one is started
                    tick()
                w.close()


def decompress(
    path: str | os.PathLike, out: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD,
    overwrite: bool = False, jobs: int | None = None, max_bytes: int | None = None, progress: bool = False,
) -> list[Path]:
    """Decode a ``.ggz`` file to ``out``: a folder (the default), or one safetensors file when ``out``
    ends in ``.safetensors``. Weights keep their stored dtypes.

    A folder holds ``model.safetensors`` or shards ``model-0000k-of-0000n.safetensors`` with an index,
    and the stored side files; tied weights (aliases) are left out, as ``save_pretrained`` does, and
    tied again by transformers when it loads the folder. A single file holds every name (an alias
    as a copy, safetensors cannot share). An existing ``out`` is refused unless ``overwrite``; the
    output appears complete or not at all. Returns the files written.
    """
    out = Path(out)
    jobs = jobs or default_jobs()
    with Reader(path, max_bytes=max_bytes, jobs=jobs) as r:
        entries = r.header["tensors"]
        meta = {"format": "pt", "ggprior_source": Path(path).name}
        bar = tqdm(total=len(entries), desc="decompress", disable=not progress, leave=False)
        if out.suffix == ".safetensors":
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out}: already exists (pass --overwrite / overwrite=True to replace it)")
            specs = [(e["name"], DTYPES[e["dtype"]][0], tuple(e["shape"])) for e in entries]
            with written(out), atomic_path(out) as tmp:
                _write_files(r, [(tmp, specs)], meta, jobs, bar.update)
            bar.close()
            return [out]
        files = r.files()
        specs = [(e["name"], DTYPES[e["dtype"]][0], tuple(e["shape"])) for e in entries if e["encoding"] != "alias"]
        shards = plan_shards(specs, max_shard_size)
        done = []
        with written(out), atomic_dir(out, overwrite=overwrite) as tmp:
            for name, data in files.items():  # names checked by the reader: relative, no "..", no file also a folder
                top = name.split("/")[0]
                if top == INDEX or top.endswith(".safetensors"):
                    raise ContainerError(f"{path}: stored file {name!r} would clash with the weights")
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
                done.append(out / name)
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            _write_files(r, [(tmp / f, shard) for f, shard in zip(names, shards, strict=True)], meta, jobs, bar.update)
            done += [out / f for f in names]
            if len(shards) > 1:
                total = sum(dt.itemsize * _numel(shape) for _, dt, shape in specs)
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: f for f, shard in zip(names, shards, strict=True) for n, _, _ in shard}}
                (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                done.append(out / INDEX)
        bar.close()
        return done


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, *, jobs: int | None = None,
                    max_bytes: int | None = None, **kwargs):
    """The transformers model stored in a ``.ggz`` file, like ``AutoModel.from_pretrained``.

    The class is ``model_class`` or the stored config's ``architectures[0]`` (``AutoModel`` when it
    has none); ``kwargs`` (``torch_dtype``, ``device_map``, ...) go to its ``from_pretrained``.
    The file is decoded into a temporary folder that is removed afterwards.
    """
    import transformers

    with Reader(path, max_bytes=1 << 62, jobs=1) as r:
        cfg = r.files().get("config.json")
    if cfg is None:
        raise ContainerError(f"{path}: holds no config.json; decompress it and build the model by hand")
    if model_class is None:
        archs = json.loads(cfg).get("architectures") or []
        model_class = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
        if model_class is None:
            raise ContainerError(f"{path}: transformers has no class {archs[0]!r}; pass model_class=")
    with tempfile.TemporaryDirectory(prefix="ggprior-") as tmp:
        folder = Path(tmp) / "model"
        decompress(path, folder, jobs=jobs, max_bytes=max_bytes)
        return model_class.from_pretrained(folder, **kwargs)
