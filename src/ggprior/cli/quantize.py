"""``ggprior quantize SOURCE OUT --format F``: store a model's weights in RF8, FP16, BF16, FP8 or int8."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from .app import OVERWRITE_HELP, app, check_output, console, fail, need, renamed
from .choices import FORMATS

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model")
USAGE = "ggprior quantize SOURCE OUT --format F [options]"


@app.command("quantize")
def quantize_cmd(
    source: str = typer.Argument(None, metavar="SOURCE", help="a .safetensors file, a HF folder, a .bin/.pt state dict, or minilm"),
    out: Path = typer.Argument(None, metavar="OUT", help="output folder (quantized.safetensors and a per-tensor table)"),
    fmt: str = typer.Option(..., "--format", help=f"one of {', '.join(FORMATS)}"),
    include: str = typer.Option(None, "--include", help="only tensors whose name matches this regex"),
    exclude: str = typer.Option(None, "--exclude", help="keep tensors whose name matches this regex as they are"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Quantize every floating-point matrix of SOURCE into OUT/quantized.safetensors (per-tensor table beside it)."""
    renamed(old_out, "--out", f"the output folder is the second argument: {USAGE}")
    need(source, "SOURCE", USAGE)
    need(out, "OUT", USAGE)
    if fmt not in FORMATS:
        fail(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    from ..formats import QUANTIZED_FILE

    check_output(out, (source,), overwrite=overwrite, writes=(out / QUANTIZED_FILE,))
    from tqdm import tqdm

    from ..formats import parse_select, save_quantized
    from ..io import SourceError, write_table

    try:
        select = parse_select(include, exclude)
        out.mkdir(parents=True, exist_ok=True)
        rows = save_quantized(source, out / QUANTIZED_FILE, fmt, select=select,
                              progress=lambda it: tqdm(it, desc=f"quantize {fmt}", unit="tensor", leave=False))
    except (SourceError, ValueError, TypeError, OSError) as e:
        fail(str(e))
    folder = Path(source)
    if folder.is_dir():
        for name in COPIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
    write_table(rows, out, "quantize", title=f"{source} in {fmt}")
    n_in, n_out = sum(r["bytes_in"] for r in rows), sum(r["bytes_out"] for r in rows)
    worst = min(rows, key=lambda r: r["sqnr_db"], default=None)
    console.print(f"wrote {out / QUANTIZED_FILE}: {len(rows)} tensors in {fmt}, {n_in:,} -> {n_out:,} bytes"
                  + (f"; lowest SQNR {worst['sqnr_db']:.1f} dB ({worst['tensor']})" if worst else ""))
    inf = [r for r in rows if r["saturated"]]
    if inf:
        console.print(f"note: {sum(r['saturated'] for r in inf):,} infinite values stored as {fmt}'s largest finite "
                      f"value, in {', '.join(r['tensor'] for r in inf)} (SQNR over the finite values)")
