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


def to_text(rows: Sequence[dict], columns: Sequence[str], width: int, digits: int = 4) -> str:
    """A plain-text table of at most ``width`` characters a line, for a console or a pipe.

    Every cell is printed whole (a number is never cut): the leading columns that fit are
    shown, the first one always, and a last line names the columns left out.
    """
    cells = [[f"{r[c]:,}" if isinstance(r.get(c), int) and not isinstance(r.get(c), bool) else _fmt(r.get(c), digits)
              for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    shown, used = 0, -2
    while shown < len(columns) and (shown == 0 or used + 2 + widths[shown] <= width):
        used += 2 + widths[shown]
        shown += 1
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values[:shown], widths, numeric, strict=False)).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths]), *(line(row) for row in cells)]
    if shown < len(columns):
        out.append(f"(not shown at width {width}: {', '.join(columns[shown:])})")
    return "\n".join(out) + "\n"
