"""``ggprior compress | decompress | inspect | measure``: the compressed model file and code lengths."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import OVERWRITE_HELP, app, check_output, console, fail, need, renamed
from .choices import CODERS, INCLUDE

STEP_HELP = "quantization step for every tensor"
BITS_HELP = "per-tensor step of a symmetric fixed-length quantizer of this many bits (the paper's grid: 10)"
REL_HELP = ("per-tensor step giving this relative RMS error (default 0.005 when no rule is given: MiniLM embedding "
            "cosine 0.9997, SmolLM2 perplexity +0.13%, about 7.9 bits/weight; docs/results/checkpoints)")
SELECT_HELP = "quantize 'all' floating tensors, or only 'matrices' (norms and biases kept exact)"
JOBS_HELP = "threads coding chunks (default: every core)"
LOSSLESS_HELP = "store every bf16/fp16/fp32 tensor bit-exactly (NaN and Inf included); no quantization"
TARGET_HELP = ("bits/weight over the quantized tensors: per-tensor steps from the GG-model bit allocation, "
               "weighted by each tensor's sensitivity (--calibration; --coder ans or ans-hist)")
CALIBRATION_HELP = ("text the model is run on to weigh each tensor in the --target-bits/--target-size allocation (the "
                    "Fisher information of its own outputs): a UTF-8 text file, a shipped corpus (bbc-lm, dialog-lm), "
                    "or none (every tensor alike); default bbc-lm for a model folder, none for a bare weights file")
CALIB_TOKENS_HELP = "tokens of calibration text (blocks of 256; default 4096)"
CHANNELS_HELP = ("shape each matrix's step per row and column by the Fisher information of the calibration (a few bits "
                 "a row and column; docs/results/channel_scales); default on wherever the allocation is calibrated")
PER_ROW_HELP = ("give every row (dim 0) of each matrix its own step with the --rel-error (default 0.005) on that row "
                "(steps stored as bfloat16, about 11 bits a row)")
SIZE_HELP = ("size of the whole .ggz file (300MB, 1.5GiB or bytes; header, side files and tables included): steps "
             "from the GG-model bit allocation, the file within 1% under it")
TRELLIS_HELP = ("dependent (trellis) quantization, 8 states, at about the scalar quantizer's error for the step rule: "
                "~0.17 bit/weight smaller (docs/results/rate_distortion/trellis.md), a tensor falling back to the scalar "
                "quantizer where that is smaller; with --target-bits/--target-size too; not with --per-row")
INCLUDE_GONE = "use --select all|matrices (--include is a tensor-name regex, as in ggprior quantize)"


def _errors() -> tuple[type[Exception], ...]:
    from ..codec import CodingError, ContainerError, QuantError
    from ..io import SourceError

    return (SourceError, ContainerError, CodingError, QuantError, ValueError, OSError)


def _step_args(step: float | None, bits: int | None, rel_error: float | None) -> dict:
    if sum(v is not None for v in (step, bits, rel_error)) > 1:
        fail("give only one of --step, --bits, --rel-error")
    return {"step": step, "bits": bits, "rel_error": rel_error}


def _calibrated(source: str, spec: str | None, tokens: int | None,
                channels: bool | None) -> tuple[dict | None, dict | None, str]:
    """Sensitivity weights for a target's allocation (the model folder run on the calibration text, or None), its
    channel scales (``channels`` not False; or None), and a note saying which."""
    from ..codec.allocate import AllocationError
    from ..codec.sensitivity import CALIBRATION_TOKENS, calibration_weights
    from ..io.sources import BUILTIN_MODELS, builtin_model_dir
    from ..tasks.data import DataError, calibration_texts

    folder = builtin_model_dir(source) if source in BUILTIN_MODELS else Path(source)
    runnable = (folder / "config.json").is_file()
    if channels and (spec == "none" or not runnable):
        why = "--calibration none turns off" if spec == "none" else f"needs a model folder ({source} is not one)"
        fail(f"--channel-scales come from the calibration, which {why}")
    if spec == "none":
        return None, None, "every tensor weighs the same in the allocation (--calibration none)"
    if spec is None and not runnable:
        return None, None, (f"every tensor weighs the same in the allocation: {source} is not a model folder with a "
                            "config.json to run on calibration text")
    if not runnable:
        fail(f"{source}: --calibration runs the model, which needs a Hugging Face folder with a config.json and tokenizer")
    tokens = tokens or CALIBRATION_TOKENS
    try:
        got = calibration_weights(folder, calibration_texts(spec or "bbc-lm"), tokens=tokens, progress=True,
                                  channels=channels is not False)
    except (AllocationError, DataError) as e:
        fail(str(e))
    w, scales = got if channels is not False else (got, None)
    how = ", steps shaped per row and column" if scales else ""
    return w, scales, f"allocation weighted by the model's Fisher information on {spec or 'bbc-lm'} ({tokens:,} tokens{how})"


def _select(select: str) -> str:
    if select not in INCLUDE:
        fail(f"--select must be one of {', '.join(INCLUDE)}, got {select!r}")
    return select


@app.command("compress")
def compress_cmd(
    source: str = typer.Argument(..., help="a .safetensors file, a HF folder, a .bin/.pt state dict, or minilm"),
    out: Path = typer.Argument(..., help="output .ggz file"),
    step: float = typer.Option(None, "--step", help=STEP_HELP),
    bits: int = typer.Option(None, "--bits", help=BITS_HELP),
    rel_error: float = typer.Option(None, "--rel-error", help=REL_HELP),
    coder: str = typer.Option("ans", "--coder", help=f"one of {', '.join(CODERS)}"),
    select: str = typer.Option("all", "--select", help=SELECT_HELP),
    gg_fit: str = typer.Option("moment", "--gg-fit", help="GG fit for --coder ans: moment or ml"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    jobs: int = typer.Option(None, "--jobs", min=1, help=JOBS_HELP),
    lossless: bool = typer.Option(False, "--lossless", help=LOSSLESS_HELP),
    target_bits: float = typer.Option(None, "--target-bits", help=TARGET_HELP),
    target_size: str = typer.Option(None, "--target-size", help=SIZE_HELP),
    per_row: bool = typer.Option(False, "--per-row", help=PER_ROW_HELP),
    trellis: bool = typer.Option(False, "--trellis", help=TRELLIS_HELP),
    calibration: str = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    calibration_tokens: int = typer.Option(None, "--calibration-tokens", min=1, help=CALIB_TOKENS_HELP),
    channel_scales: bool = typer.Option(None, "--channel-scales/--no-channel-scales", help=CHANNELS_HELP),
    old_include: str = typer.Option(None, "--include", hidden=True),
) -> None:
    """Quantize and entropy-code a model into a .ggz file (a folder's config and tokenizer files go inside)."""
    renamed(old_include, "--include", INCLUDE_GONE)
    rule = _step_args(step, bits, rel_error)
    given = [f for f, v in (("--step", step), ("--bits", bits), ("--rel-error", rel_error), ("--per-row", per_row or None))
             if v is not None]
    targets = [f for f, v in (("--target-bits", target_bits), ("--target-size", target_size)) if v is not None]
    if lossless and (targets or given or trellis):
        fail(f"--lossless stores the exact values: it takes no {' or '.join(given + targets + ['--trellis'] * trellis)}")
    if trellis and per_row:
        fail("--trellis takes --step, --bits, --rel-error or a target, not --per-row")
    if len(targets) > 1:
        fail("give only one of --target-bits, --target-size")
    if targets and given:
        fail(f"{targets[0]} chooses the steps: it takes no {given[0]}")
    if per_row and (step is not None or bits is not None):
        fail("--per-row takes --rel-error (default 0.005), not --step or --bits")
    if calibration is not None and not targets:
        fail("--calibration weighs the allocation of --target-bits or --target-size; give one of them")
    if channel_scales is not None and not targets:
        fail("--channel-scales shape the allocation of --target-bits or --target-size; give one of them")
    check_output(out, (source,), overwrite=overwrite)
    from ..codec import save_compressed, stored_bytes

    try:
        weights, scales, note = (_calibrated(source, calibration, calibration_tokens, channel_scales) if targets
                                 else (None, None, ""))
        header = save_compressed(source, out, coder=coder, include=_select(select), gg_fit=gg_fit, progress=True,
                                 jobs=jobs, lossless=lossless, target_bits=target_bits, target_size=target_size,
                                 per_row=per_row, trellis=trellis, weights=weights, channel_scales=scales, **rule)
    except _errors() as e:
        fail(str(e))
    kind = "lossless" if lossless else "trellis" if trellis else "quantized"
    q = [e for e in header["tensors"] if e["encoding"] in (kind, "quantized")]
    n = sum(_numel(e) for e in q)
    qbytes = sum(stored_bytes(e) for e in q)
    tied = sum(e["encoding"] == "alias" for e in header["tensors"])
    console.print(f"wrote {out}: {header['file_bytes']:,} bytes; {len(q)} {'lossless' if lossless else 'quantized'} tensors, "
                  f"{n:,} weights at {8 * qbytes / max(n, 1):.4f} bits/weight ({coder if kind == 'quantized' else kind}); "
                  f"{len(header['tensors']) - len(q) - tied} tensors stored raw; {tied} tied to another (stored once); "
                  f"{len(header['files'])} side files" + (f"; {note}" if note else ""))


@app.command("decompress")
def decompress_cmd(
    source: Path = typer.Argument(..., help="input .ggz file"),
    out: Path = typer.Argument(..., help="output folder (transformers loads it as it is), or a .safetensors file"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    max_shard_size: str = typer.Option("50GB", "--max-shard-size", help="shard the weights above this size (5GB, 500MB)"),
    jobs: int = typer.Option(None, "--jobs", min=1, help=JOBS_HELP),
    max_bytes: str = typer.Option(None, "--max-bytes", help="refuse a file that decodes to more (default: the RAM size)"),
) -> None:
    """Decode a .ggz file into a Hugging Face folder or a safetensors file (original dtypes)."""
    check_output(out, (source,), overwrite=overwrite)
    from ..codec import decompress
    from ..io import parse_size

    try:
        files = decompress(source, out, max_shard_size=max_shard_size, overwrite=overwrite, jobs=jobs,
                           max_bytes=None if max_bytes is None else parse_size(max_bytes), progress=True)
    except _errors() as e:
        fail(str(e))
    console.print(f"wrote {out}: {len(files)} files")


@app.command("inspect")
def inspect_cmd(
    source: Path = typer.Argument(..., help="a .ggz file"),
    out: Path = typer.Argument(None, metavar="OUT", help="also write the table (json/csv/md) to this folder"),
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Per-tensor table of a .ggz file: shape, coder, bits/weight, step, GG parameters."""
    renamed(old_out, "--out", "the table folder is the second argument: ggprior inspect SOURCE [OUT]")
    from rich.console import Console
    from rich.table import Table

    from ..codec import inspect_rows
    from ..io import write_table

    try:
        rows = inspect_rows(source)
    except _errors() as e:
        fail(str(e))
    table = Table(title=str(source))
    cols = ["name", "shape", "dtype", "coder", "bytes", "bits_per_weight", "step", "gg_mu", "gg_beta", "gg_gamma"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("name", "shape", "dtype", "coder") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    Console(width=max(console.width, 170), markup=False).print(table)
    if out is not None:
        files = write_table(rows, out, "inspect", cols, title=f"Contents of {source}")
        console.print(f"wrote {', '.join(str(p) for p in files.values())}")


@app.command("measure")
def measure_cmd(
    source: str = typer.Argument(None, metavar="SOURCE", help="a .safetensors file, a HF folder, a .bin/.pt state dict, or minilm"),
    out: Path = typer.Argument(None, metavar="OUT", help="output folder"),
    step: float = typer.Option(None, "--step", help=STEP_HELP),
    bits: int = typer.Option(None, "--bits", help=BITS_HELP),
    rel_error: float = typer.Option(None, "--rel-error", help=REL_HELP),
    select: str = typer.Option("all", "--select", help=SELECT_HELP),
    eg_k: int = typer.Option(0, "--eg-k", help="order of the fixed-order Exp-Golomb column"),
    gg_fit: str = typer.Option("moment", "--gg-fit", help="GG fit: moment or ml"),
    old_out: Path = typer.Option(None, "--out", hidden=True),
    old_include: str = typer.Option(None, "--include", hidden=True),
) -> None:
    """Code lengths of every coder per tensor and for the model (from histograms; no file written)."""
    usage = "ggprior measure SOURCE OUT [options]"
    renamed(old_out, "--out", f"the output folder is the second argument: {usage}")
    renamed(old_include, "--include", INCLUDE_GONE)
    need(source, "SOURCE", usage)
    need(out, "OUT", usage)
    from rich.table import Table

    from ..codec import measure
    from ..io import write_table, write_text
    from ..report.plots import plot_bits

    try:
        rows, summary = measure(source, include=_select(select), eg_k=eg_k, gg_fit=gg_fit, progress=True,
                                **_step_args(step, bits, rel_error))
    except _errors() as e:
        fail(str(e))
    files = write_table(rows, out, "compression", title=f"Code lengths of {summary['source']}")
    write_text(out / "compression_summary.json", json.dumps(summary, indent=1) + "\n")
    png = plot_bits(summary, out / "compression_bits.png")
    table = Table(title=f"{summary['source']} ({summary['step_rule']}, select={select}): whole model")
    for c in ("coder", "bits/weight", "CR vs FL", "ratio vs dtype", "model bytes"):
        table.add_column(c, justify="left" if c == "coder" else "right")
    for c in (k.removeprefix("bpw_") for k in summary if k.startswith("bpw_")):
        table.add_row(c, f"{summary[f'bpw_{c}']:.4f}", f"{summary[f'cr_{c}']:.4f}",
                      f"{summary[f'ratio_dtype_{c}']:.3f}", f"{summary[f'model_bytes_{c}']:,.0f}")
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}, {out / 'compression_summary.json'}, {png}")


def _numel(e: dict) -> int:
    n = 1
    for d in e["shape"]:
        n *= d
    return n


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)
