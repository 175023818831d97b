"""Tables of result rows (lists of flat dicts) as JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .atomic import write_text


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def _fmt(v: object, digits: int) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


def to_markdown(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub Markdown table of ``rows`` (floats to ``digits`` significant digits)."""
    cols = list(columns) if columns else _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` with a header line."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns) if columns else _columns(rows), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_table(
    rows: Sequence[dict], out_dir: str | os.PathLike, stem: str, columns: Sequence[str] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``stem.json``, ``stem.csv`` and ``stem.md`` under ``out_dir`` (atomically)."""
    out = Path(out_dir)
    md = (f"# {title}\n\n" if title else "") + to_markdown(rows, columns)
    return {
        "json": write_text(out / f"{stem}.json", json.dumps(list(rows), indent=1) + "\n"),
        "csv": write_text(out / f"{stem}.csv", to_csv(rows, columns)),
        "md": write_text(out / f"{stem}.md", md),
    }
