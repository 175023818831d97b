"""The committed pipeline reports are what the code produces now (issue 16): rerun the pipeline at the settings
in a committed folder's config.json, with the torch thread count its report states, and compare its tables
(seeds, summary, paper grid) line by line. Slow; run with ``python -m pytest -m slow``. The tiny MiniLM report
(docs/results/pipeline_tiny, minutes) is checked by ``-m slow`` (CI); the default one (docs/results/pipeline, about
8 minutes on 2 idle cores) by ``-m full_report`` (``make check-report``). It fails until a report is regenerated after a change that
moves its numbers."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ggprior.pipeline import PipelineConfig, run_pipeline

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
TABLES = ("## Plain against BackSlash over seeds", "## Summary", "## Coded files on the paper's grid")


def table_after(report: str, heading: str) -> list[str]:
    """The lines of the first run of ``|`` lines after the line starting with ``heading``."""
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(heading))
    table: list[str] = []
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break
    return table


def test_table_after_reads_the_table_only():
    text = "# r\n\n## Summary\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\n## Next\n\n| x |\n|---|\n| 9 |\n"
    assert table_after(text, "## Summary") == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]
    assert table_after(text, "## Next") == ["| x |", "|---|", "| 9 |"]


@pytest.mark.parametrize("folder", [
    pytest.param("pipeline_tiny", marks=pytest.mark.slow),
    pytest.param("pipeline", marks=pytest.mark.full_report),
])
def test_committed_pipeline_report_matches_a_fresh_run(tmp_path, folder):
    committed = RESULTS / folder
    config = json.loads((committed / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    cfg = PipelineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})
    report = (committed / "report.md").read_text()
    threads = int(re.search(r"torch threads (\d+)", report).group(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # training is deterministic for a given seed and thread count
    try:
        run_pipeline(cfg, tmp_path, console=Console(quiet=True), progress=False)
    finally:
        torch.set_num_threads(before)
    fresh = (tmp_path / "report.md").read_text()
    for heading in TABLES:
        want, got = table_after(report, heading), table_after(fresh, heading)
        assert len(want) > 2
        assert got == want, f"{folder}: {heading} differs from a fresh run:\n" + "\n".join(
            difflib.unified_diff(want, got, "committed", "fresh", lineterm=""))
